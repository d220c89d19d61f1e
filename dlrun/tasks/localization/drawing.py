"""Boxes and landmarks drawn on canvases (TensorBoard and mode=predict) with torchvision's
draw_bounding_boxes and draw_keypoints, the canvas enlarged first so that a label has room."""

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_keypoints

from dlrun.engine.tb import palette

DRAWN_PX = 256  # smallest side of a drawn canvas
# top, bottom, left, right, centroid (dlrun.data.single_digit.LANDMARKS)
LANDMARK_COLORS = [(255, 60, 60), (60, 200, 255), (255, 200, 0), (160, 90, 255), (60, 255, 60)]


def enlarge(images: Tensor) -> tuple[Tensor, int]:
    """[0, 1] images (B, C, H, W) -> uint8 RGB enlarged s times (nearest), and s."""
    scale = max(1, DRAWN_PX // min(images.shape[-2:]))
    rgb = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    rgb = rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb
    return rgb.repeat_interleave(scale, 2).repeat_interleave(scale, 3), scale


def draw_boxes(images: Tensor, boxes: Tensor, labels: Tensor, names: list[str], k: int) -> Tensor:
    """uint8 (B, 3, sH, sW): each canvas with its box (xyxy pixels) named names[i], coloured by
    its label (0..k-1); a label < 0 draws no box (no digit there, or none predicted)."""
    rgb, scale = enlarge(images)
    colors = palette(k)
    h, w = rgb.shape[-2:]
    limit = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for image, box, label, name in zip(
        rgb, boxes.float().cpu(), labels.tolist(), names, strict=True
    ):
        if label >= 0:
            box = torch.minimum((box * scale).clamp_min(0), limit)
            image = draw_bounding_boxes(image, box[None], [name], [colors[label]], width=2)
        out.append(image)
    return torch.stack(out)


def draw_landmarks(images: Tensor, points: Tensor) -> Tensor:
    """uint8 (B, 3, sH, sW): each canvas with its five landmarks ((B, 5, 2) (x, y) pixel indices,
    a pixel's centre at its index), one colour per landmark."""
    rgb, scale = enlarge(images)
    centres = (points.float().cpu() + 0.5) * scale
    out = []
    for image, pts in zip(rgb, centres, strict=True):
        for k, color in enumerate(LANDMARK_COLORS):
            image = draw_keypoints(image, pts[None, k : k + 1], colors=color, radius=max(2, scale))
        out.append(image)
    return torch.stack(out)
