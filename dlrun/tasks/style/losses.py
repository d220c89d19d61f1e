"""Neural style transfer's costs (Gatys et al. 2016, the notes' chapter 6) as pure functions.

Content: J_content = 1 / (4 n_H n_W n_C) sum (a_C - a_G)^2 on one layer (the notes' 1/2 sum times a
constant that `content_weight` absorbs: normalised, it does not grow with the image size).
Style: per layer J^l = 1 / (2 n_H n_W n_C)^2 sum (G_S - G_G)^2 = 1 / (4 N^2 M^2) sum (...)^2 with
the Gram matrix G = A A^T of the (n_C, n_H n_W) activations; J_style = sum_l lambda_l J^l.
Total: J = alpha J_content + beta J_style (+ an optional total-variation term).
Known answers: tests/test_style.py.
"""

from collections.abc import Mapping

from torch import Tensor

from dlrun.errors import UserError


def gram_matrix(features: Tensor) -> Tensor:
    """(B, C, H, W) activations -> (B, C, C) Gram matrices sum_hw a_c a_c' (not normalised)."""
    a = features.flatten(2)  # (B, C, H*W)
    return a @ a.transpose(1, 2)


def content_cost(generated: Tensor, content: Tensor) -> Tensor:
    """1 / (4 n_H n_W n_C) sum (a_C - a_G)^2, averaged over the batch."""
    b, c, h, w = generated.shape
    return (generated - content).pow(2).sum() / (4 * c * h * w * b)


def layer_style_cost(generated: Tensor, style_gram: Tensor) -> Tensor:
    """1 / (2 n_H n_W n_C)^2 sum (G_S - G_G)^2 of one layer; `style_gram` (B or 1, C, C).

    The style image may have another size than the generated one: its Gram matrix is a sum
    over its own positions, so it is rescaled to the generated image's n_H n_W first.
    """
    b, c, h, w = generated.shape
    return (gram_matrix(generated) - style_gram).pow(2).sum() / ((2 * c * h * w) ** 2 * b)


def style_gram_target(style: Tensor, generated_hw: int) -> Tensor:
    """The style image's Gram matrix on the scale of a generated map of `generated_hw` positions."""
    return gram_matrix(style) * (generated_hw / (style.shape[-2] * style.shape[-1]))


def total_variation(image: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels (B, C, H, W): smooths high-frequency noise."""
    dh = (image[..., 1:, :] - image[..., :-1, :]).pow(2).mean()
    dw = (image[..., :, 1:] - image[..., :, :-1]).pow(2).mean()
    return dh + dw


class StyleObjective:
    """J = content_weight J_content + style_weight sum_l w_l J^l + tv_weight TV (configs/loss/style.yaml).

    The layers are named as `dlrun.models.style.vgg_layer_names` names them (relu4_2, conv1_1...).
    """

    def __init__(
        self,
        name: str = "style",
        *,
        content_layer: str = "relu4_2",
        style_layers: Mapping[str, float],
        content_weight: float = 1.0,
        style_weight: float = 1.0,
        tv_weight: float = 0.0,
    ) -> None:
        weights = {str(k): float(v) for k, v in dict(style_layers or {}).items()}
        if not weights or min(weights.values()) < 0 or sum(weights.values()) == 0:
            raise UserError(
                "style.style_layers must map at least one layer name to a weight >= 0 (not all "
                f"0), e.g. style.style_layers={{relu1_1:1,relu3_1:1}}; got {weights or 'none'}."
            )
        for key, value in (
            ("content_weight", content_weight),
            ("style_weight", style_weight),
            ("tv_weight", tv_weight),
        ):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise UserError(f"style.{key} must be a number >= 0, got {value!r}.")
        if content_weight == 0 and style_weight == 0:
            raise UserError("style.content_weight and style.style_weight cannot both be 0.")
        self.name, self.content_layer = name, str(content_layer)
        self.style_layers = {k: v for k, v in weights.items() if v > 0}
        self.content_weight, self.style_weight = float(content_weight), float(style_weight)
        self.tv_weight = float(tv_weight)

    @property
    def layers(self) -> list[str]:
        """Every layer the costs read (content first)."""
        return [self.content_layer, *(k for k in self.style_layers if k != self.content_layer)]

    def targets(
        self, content: Mapping[str, Tensor], style: Mapping[str, Tensor], hw: Mapping[str, int]
    ) -> dict[str, Tensor]:
        """What the costs compare against, computed once: the content activations and the style
        Gram matrices (each on the scale of the generated map's `hw[layer]` positions)."""
        out = {"content": content[self.content_layer].detach()}
        for layer in self.style_layers:
            out[f"gram/{layer}"] = style_gram_target(style[layer].detach(), hw[layer])
        return out

    def __call__(
        self, features: Mapping[str, Tensor], targets: Mapping[str, Tensor], image: Tensor
    ) -> dict[str, Tensor]:
        """{"loss", "content_loss", "style_loss"(, "tv_loss")} of the generated image's features."""
        content = content_cost(features[self.content_layer].float(), targets["content"].float())
        style = sum(
            w * layer_style_cost(features[layer].float(), targets[f"gram/{layer}"].float())
            for layer, w in self.style_layers.items()
        )
        out = {"content_loss": content, "style_loss": style}
        loss = self.content_weight * content + self.style_weight * style
        if self.tv_weight:
            out["tv_loss"] = total_variation(image.float())
            loss = loss + self.tv_weight * out["tv_loss"]
        return {"loss": loss, **out}
