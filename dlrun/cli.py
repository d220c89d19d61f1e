"""The `dlrun` command: compose the configs, build every piece, run the mode."""

import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dlrun import checkpoint, rundir, transfer, validate
from dlrun.errors import UserError
from dlrun.models import model_kwargs
from dlrun.trainers.guards import Interrupted

log = logging.getLogger("dlrun")
MODES = ("train", "eval", "sample")
# The configs live beside the package (DESIGN section 2); an editable install keeps that layout.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
OmegaConf.register_new_resolver("unique_dir", rundir.unique_dir, replace=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device='{name}' is not a device; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device='{name}' asks for CUDA but none is available here; use device=cpu or auto."
        )
    return device


def build(node: DictConfig | dict, what: str, **kwargs: Any) -> Any:
    """instantiate(), with a failing constructor reported as a user error naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        reason = f"{type(cause).__name__}: {cause}" if cause else str(err)
        raise UserError(
            f"The {what} config could not be built ({reason}). Check the {what}.* values."
        ) from err


def hparams_of(cfg: DictConfig, choices: Mapping[str, str | None]) -> dict[str, Any]:
    """The chosen options and the key hyperparameters, flattened for TensorBoard's HParams tab."""
    out: dict[str, Any] = {
        g: str(choices.get(g)) for g in ("model", "data", "loss", "optim", "sched")
    }
    out |= {
        "seed": cfg.seed,
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.get("weight_decay", 0),
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "trainer.precision": cfg.trainer.precision,
        "trainer.channels_last": cfg.trainer.get("channels_last", False),
        "eval.tta": cfg.eval.tta,
    }
    for key, value in cfg.model.items():
        if isinstance(value, int | float | str | bool) and not str(key).startswith("_"):
            out[f"model.{key}"] = value
    return out


def run(
    cfg: DictConfig,
    run_dir: str | Path,
    choices: Mapping[str, str | None] | None = None,
    commit: Callable[[], None] | None = None,
) -> dict:
    """Everything `dlrun` does after Hydra composed the config; tests call it directly.

    Every check comes before `commit` (which writes .hydra/ and the log file); nothing is written
    to the run folder before it, so a refused run leaves an existing folder as it was.
    """
    validate.check_config(cfg)
    if cfg.mode not in MODES:
        raise UserError(
            f"mode='{cfg.mode}' is not a mode of this task; use one of: {', '.join(MODES)}."
        )
    if cfg.mode in ("eval", "sample") and not cfg.ckpt:
        raise UserError(
            f"mode={cfg.mode} needs ckpt=PATH, the checkpoint to use (e.g. <run>/checkpoints/best.pt)."
        )
    missing = [key for key in cfg.data if OmegaConf.is_missing(cfg.data, key)]
    if missing:
        data = (choices or {}).get("data") or cfg.data.get("name")
        raise UserError(
            f"data.{missing[0]} must be set for data={data}, e.g. data.{missing[0]}=PATH."
        )
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    run_dir = Path(run_dir)
    commit = commit or (lambda: run_dir.mkdir(parents=True, exist_ok=True))
    log.info("run folder: %s", run_dir.resolve())
    log.info("TensorBoard: tensorboard --logdir %s", run_dir.resolve())

    data = build(cfg.data, "data")
    with open_dict(cfg):  # image folders know their class count only once read
        cfg.data.num_classes = data.num_classes
    data.setup(device, cfg.seed)
    # model.freeze is a training choice, not a constructor argument: model_kwargs leaves it out.
    model = build(model_kwargs(cfg.model), "model")
    if not hasattr(
        model, "generator"
    ):  # a GAN's input is noise; its sizes are checked by its trainer
        shape = (data.channels, data.image_size, data.image_size)
        validate.check_image_size(
            model, shape, (choices or {}).get("model") or type(model).__name__
        )
    if hasattr(model, "init_from_data"):  # a data-dependent init (airbench's whitening stem)
        model.init_from_data(data.train_loader().normalize(data.train_x[:5000]).cpu())
    if cfg.ckpt and cfg.mode == "train" and not cfg.resume:  # start from a checkpoint's weights
        transfer.load_weights(model, transfer.read_weights(cfg.ckpt), cfg.ckpt)
    transfer.freeze(model, cfg.model.get("freeze"))
    # Partial first, then call: instantiate() would copy these live objects into the config.
    trainer = build(cfg.trainer, "trainer", _partial_=True)(
        model=model,
        data=data,
        loss=build(cfg.loss, "loss"),
        optim=build(cfg.optim, "optim"),
        sched=build(cfg.sched, "sched"),
        run_dir=run_dir,
        device=device,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        hparams=hparams_of(cfg, choices or {}),
        tta=cfg.eval.tta,
        metrics_cfg=OmegaConf.to_container(cfg.metrics, resolve=True),
    )
    resolved = trainer.config
    if cfg.mode == "sample":
        if not hasattr(trainer, "sample"):
            raise UserError(
                "mode=sample generates images: it needs a generative model (model=gan, model=dcgan)."
            )
        checkpoint.load_model_state(model, checkpoint.load(cfg.ckpt), cfg.ckpt, config=resolved)
        commit()
        paths = trainer.sample(int(cfg.sample.n), run_dir / "samples")
        log.info("wrote %d samples and grid.png to %s", len(paths), run_dir / "samples")
        return {"samples": float(len(paths))}
    if cfg.mode == "eval":
        state = checkpoint.load(cfg.ckpt)
        checkpoint.load_model_state(model, state, cfg.ckpt, config=resolved)
        commit()
        trainer.epoch, trainer.step_count = state.get("epoch", 0), state.get("step", 0)
        trainer.train_time = state.get("train_time", 0.0)
        metrics = trainer.write_metrics(trainer.evaluate(data.test_loader(), "test"))
        log.info(", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/")))
        return metrics
    trainer.prepare(resume=bool(cfg.resume))
    commit()
    metrics = trainer.fit(resume=bool(cfg.resume))
    log.info(
        "done: %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("val/"))
    )
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    buffer = rundir.buffer_logs()
    committed = False

    def commit() -> None:
        nonlocal committed
        rundir.commit(run_dir, cfg, buffer)
        committed = True

    try:
        metrics = run(cfg, run_dir, dict(hc.runtime.choices), commit)
    except Interrupted as err:
        print(f"dlrun: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except UserError as err:
        if not committed:
            rundir.drop(run_dir, buffer)
        print(f"dlrun: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        if not committed:
            rundir.drop(run_dir, buffer)
            print(
                "dlrun: interrupted before training started; nothing was written.", file=sys.stderr
            )
        else:
            print(
                f"dlrun: interrupted; continue with resume=true hydra.run.dir={run_dir}",
                file=sys.stderr,
            )
        sys.exit(130)
    return metrics.get("val/acc")  # the objective a Hydra sweeper (e.g. Optuna) maximises


def main() -> None:
    """`dlrun`: Hydra's errors in composing the config become one message and exit code 2 as well.

    Hydra prints a config it cannot compose (a YAML error, an unknown option) itself, sometimes
    with a traceback; with HYDRA_FULL_ERROR=1 it raises instead, and we print the message. A user
    who set HYDRA_FULL_ERROR=1 gets Hydra's full traceback, as Hydra documents.
    """
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        if full:
            raise
        cause = err.__cause__
        detail = str(cause).strip().splitlines()[0] if isinstance(cause, Exception) else ""
        detail = f" ({type(cause).__name__}: {detail})" if detail else ""
        print(f"dlrun: error: {one_paragraph(str(err))}{detail}", file=sys.stderr)
        sys.exit(UserError.exit_code)


def one_paragraph(message: str) -> str:
    """Hydra's multi-line message as one paragraph: list items comma-separated, no search path."""
    out: list[str] = []
    for line in message.split("\nConfig search path:")[0].splitlines():
        if not line.strip():
            continue
        if line.startswith("\t") and out and not out[-1].endswith(":"):
            out[-1] += ","  # the previous line was an item of the same tab-indented list
        out.append(line.strip())
    return " ".join(out)
