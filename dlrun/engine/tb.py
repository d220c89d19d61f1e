"""TensorBoard helpers: the writer that leads with the curves, the resolved config as text, the
hparams summary, class colours for drawings."""

import colorsys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

HParam = int | float | str | bool
LAYOUT_TAG = "custom_scalars__config__"  # where add_custom_scalars stores the layout


def headline_tags(monitor: str | None) -> dict[str, str]:
    """The scalars copied to the leading groups: the loss and the monitor's name (acc, miou,
    fid_classifier, ...), each with its per-step training curve and its validation points.

    TensorBoard's Time Series and Scalars tabs group tags by the part before the first '/', sort
    the groups by name ('/' and digits before letters) and open the first two: `1_loss` and
    `2_<monitor>` sort before every other group (inside, test, time, train, val), so those two
    open on the four curves. The full record keeps the metrics.json names (train/*, val/*)."""
    names = ["loss"]
    name = (monitor or "").split("/", 1)[-1]
    if name and name not in names:
        names.append(name)
    out: dict[str, str] = {}
    for i, name in enumerate(names, 1):
        out[f"train/{name}_step"] = f"{i}_{name}/train"  # every log_every_n_steps
        out[f"val/{name}"] = f"{i}_{name}/val"
    return out


class Writer(SummaryWriter):
    """A SummaryWriter that also writes the headline scalars (`headline_tags`) under their
    leading names; `log_layout` names them in a fresh run, a resumed run reads them back from
    the layout its first event file holds."""

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        super().__init__(log_dir, purge_step=purge_step)
        self.headline: dict[str, str] = _stored_headline(Path(log_dir))

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None,
                   *args: Any, **kwargs: Any) -> None:  # fmt: skip
        super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)
        if tag in self.headline:
            super().add_scalar(self.headline[tag], scalar_value, global_step, *args, **kwargs)


def _stored_headline(run_dir: Path) -> dict[str, str]:
    """A resumed run's headline, from the Custom Scalars layout its first event file holds (the
    monitor's chart has ^val/<name>$); {} in a fresh folder."""
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    if not files:
        return {}
    for event in EventFileLoader(str(files[0])).Load():
        for value in event.summary.value:
            if value.tag == LAYOUT_TAG:
                layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
                names = [
                    tag[len("^val/") : -1]
                    for category in layout.category for chart in category.chart
                    for tag in chart.multiline.tag if tag.startswith("^val/")
                ]  # fmt: skip
                return headline_tags("val/" + next((n for n in names if n != "loss"), "loss"))
        if event.step > 0:  # the header is written at step 0, before any training
            break
    return {}


def log_config(writer: SummaryWriter, yaml_text: str) -> None:
    # Four-space indent makes TensorBoard's markdown render the YAML verbatim.
    writer.add_text("config", "\n".join("    " + line for line in yaml_text.splitlines()), 0)


def log_layout(writer: SummaryWriter, monitor: str | None) -> None:
    """The Custom Scalars tab: loss, and the monitor (accuracy for classifiers), each with its
    train and val curves on one chart, the first things to look at; and the Writer's headline
    copies of those curves (`headline_tags`), the first cards of Time Series and Scalars."""
    # train/<m>_step: the per-step values (every log_every_n_steps), a curve even in a short run
    charts = {"loss (train, val)": ["Multiline", [r"^train/loss(_step)?$", r"^val/loss$"]]}
    name = (monitor or "").split("/", 1)[-1]
    if name and name != "loss":
        charts[f"{name} (train, val)"] = [
            "Multiline",
            [rf"^train/{name}(_step)?$", rf"^val/{name}$"],
        ]
    if isinstance(writer, Writer):
        writer.headline = headline_tags(monitor)
    writer.add_custom_scalars({"curves": charts})  # a resumed Writer reads its headline here


def log_hparams(
    writer: SummaryWriter, params: Mapping[str, HParam], metrics: Iterable[str]
) -> None:
    """Declare this run's hyperparameters and the metric tags the HParams tab should show.

    The metric values are the run's ordinary scalars under those tags, so the summary is written
    once at the start (a crashed run still shows up) instead of through `add_hparams`, which would
    create a separate sub-run.
    """
    exp, ssi, sei = hparams(dict(params), {tag: 0.0 for tag in metrics})
    _mark_swept(exp, set(swept_keys()))
    for summary in (exp, ssi, sei):
        writer.file_writer.add_summary(summary)


def _mark_swept(exp: Any, swept: set[str]) -> None:
    """HParamInfo.differs on the keys a sweep varies: TensorBoard lists those first and shows
    them as columns by default (it shows the first few, sorted by differs, then by name)."""
    if not swept:
        return
    value = exp.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        if info.name in swept:
            info.differs = True
    value.metadata.plugin_data.content = data.SerializeToString()


def swept_keys() -> list[str]:
    """In a sweep job (`dlrun -m`): the keys and groups its command line set (model, optim.lr, ...),
    less where and how it runs (hydra.job.config.override_dirname.exclude_keys)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return []
    hc = HydraConfig.get()
    excluded = set(hc.job.config.override_dirname.exclude_keys)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task if "=" in o]
    return [k for k in keys if k not in excluded]


def hparams_of(cfg: DictConfig, choices: Mapping[str, str | None]) -> dict[str, HParam]:
    """The chosen options and the key hyperparameters, flattened for TensorBoard's HParams tab;
    in a sweep, the keys it varies first (with their values, also keys not listed below)."""
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
    swept: dict[str, HParam] = {}
    for key in swept_keys():
        value = out.get(key, choices.get(key) or OmegaConf.select(cfg, key, default=None))
        if isinstance(value, int | float | str | bool):
            swept[key] = value
    return swept | {k: v for k, v in out.items() if k not in swept}


def palette(k: int) -> list[tuple[int, int, int]]:
    """k distinct colours (HSV around the circle), for classes 1..k."""
    return [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / k, 0.9, 1.0))  # type: ignore[misc]
        for i in range(k)
    ]
