"""TensorBoard helpers: the resolved config as text and the hparams summary for the HParams tab."""

from collections.abc import Iterable, Mapping

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
