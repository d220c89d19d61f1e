"""TensorBoard helpers: the resolved config as text and the hparams summary for the HParams tab."""

from collections.abc import Iterable, Mapping

from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

HParam = int | float | str | bool


def log_config(writer: SummaryWriter, yaml_text: str) -> None:
    # Four-space indent makes TensorBoard's markdown render the YAML verbatim.
    writer.add_text("config", "\n".join("    " + line for line in yaml_text.splitlines()), 0)


def log_hparams(
    writer: SummaryWriter, params: Mapping[str, HParam], metrics: Iterable[str]
) -> None:
    """Declare this run's hyperparameters and the metric tags the HParams tab should show.

    The metric values are the run's ordinary scalars under those tags, so the summary is written
    once at the start (a crashed run still shows up) instead of through `add_hparams`, which would
    create a separate sub-run.
    """
    exp, ssi, sei = hparams(dict(params), {tag: 0.0 for tag in metrics})
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)


def hparams_of(cfg: DictConfig, choices: Mapping[str, str | None]) -> dict[str, HParam]:
    """The chosen options and the key hyperparameters, flattened for TensorBoard's HParams tab."""
    out: dict[str, HParam] = {
        g: str(choices.get(g)) for g in ("model", "data", "loss", "optim", "sched")
    }
    out |= {
        "seed": cfg.seed,
        "optim.lr": cfg.optim.lr,
        "optim.weight_decay": cfg.optim.get("weight_decay", 0),
        "data.batch_size": cfg.data.batch_size,
        "trainer.max_epochs": cfg.trainer.max_epochs,
        "trainer.precision": cfg.trainer.get("precision", "fp32"),
        "trainer.channels_last": cfg.trainer.get("channels_last", False),
        "eval.tta": cfg.eval.tta,
    }
    if str(cfg.trainer.get("_target_", "")).endswith(".DistillTrainer"):  # trainer=distill
        out |= {"distill.temperature": cfg.trainer.temperature, "distill.alpha": cfg.trainer.alpha}
    for key, value in cfg.model.items():
        if isinstance(value, int | float | str | bool) and not str(key).startswith("_"):
            out[f"model.{key}"] = value
    return out
