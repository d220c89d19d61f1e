"""`loss=detection`: a detector computes its own loss terms (YOLO's box / obj / noobj / cls,
Faster R-CNN's RPN and head terms); this objective weighs them and names a mistyped term."""

from collections.abc import Mapping

from torch import Tensor

from dlrun.errors import UserError


class DetectionObjective:
    """Each term times `weights[term]` (1 where not given); the trainer sums and logs them."""

    def __init__(self, name: str, weights: Mapping[str, float] | None = None) -> None:
        self.name, self.weights = name, dict(weights or {})
        bad = {k: v for k, v in self.weights.items() if float(v) < 0}
        if bad:
            raise UserError(f"loss.weights must be >= 0, got {bad}.")

    def __call__(self, terms: Mapping[str, Tensor]) -> dict[str, Tensor]:
        unknown = sorted(set(self.weights) - set(terms))
        if unknown:
            raise UserError(
                f"loss.weights names {', '.join(unknown)}, not a loss term of this detector; "
                f"its terms are: {', '.join(terms)}."
            )
        return {k: v * float(self.weights.get(k, 1.0)) for k, v in terms.items()}
