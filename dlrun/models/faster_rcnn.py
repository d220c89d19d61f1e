"""torchvision's Faster R-CNN on a small backbone trained from scratch, sized for small canvases.

The region proposal network slides over one stride-`stride` feature map with anchors fitted to
the training boxes (the trainer's k-means, as for `yolo`; a buffer, so checkpoints carry them);
RoIAlign crops 7x7 features of each proposal for a two-layer head. `min_size` / `max_size` are
the canvas size, so torchvision's transform never resizes (its 800 px default would blow a 64 px
scene up 12x), and its normalisation is the identity: the data module has already normalised.

Same contract as `yolo`: train mode `model(images, boxes, labels)` -> dict of loss terms (the
RPN's and the head's), eval mode `model(images)` -> per-image "boxes", "scores", "labels" 0..K-1
(torchvision counts the background as class 0; the wrapper shifts).
"""

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from dlrun.models.yolo import Detections, conv_bn


class SmallBackbone(nn.Sequential):
    """conv-BN-LeakyReLU + max-pool per halving, down to `stride`; `out_channels` for torchvision."""

    def __init__(self, in_channels: int, width: int, stride: int) -> None:
        layers, cin, w = [], in_channels, width
        for _ in range(int(math.log2(stride))):
            layers += [conv_bn(cin, w), nn.MaxPool2d(2)]
            cin, w = w, w * 2
        super().__init__(*layers, conv_bn(cin, cin * 2), conv_bn(cin * 2, cin * 2))
        self.out_channels = cin * 2


class FasterRCNN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        anchors: list[list[float]] | None = None,
        num_anchors: int = 5,
        width: int = 16,
        stride: int = 4,
        representation: int = 128,
        rpn_proposals: int = 50,
        box_batch_size: int = 64,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        if stride not in (4, 8, 16) or image_size % stride:
            raise ValueError(
                f"model.stride must be 4, 8 or 16 and divide the image size {image_size}, "
                f"got {stride}"
            )
        if anchors is not None:
            num_anchors = len(anchors)
        given = torch.tensor(anchors, dtype=torch.float32) if anchors is not None else None
        self.register_buffer("anchors", given if given is not None else torch.zeros(num_anchors, 2))
        backbone = SmallBackbone(in_channels, width, stride)
        # One size per anchor and a single ratio: num_anchors_per_location() is then A, and the
        # cell anchors are replaced by the fitted (w, h) pairs in _refresh_anchors.
        generator = AnchorGenerator(sizes=((32.0,) * num_anchors,), aspect_ratios=((1.0,),))
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
        self.detector = TVFasterRCNN(
            backbone,
            min_size=image_size,
            max_size=image_size,
            image_mean=[0.0] * in_channels,
            image_std=[1.0] * in_channels,
            rpn_anchor_generator=generator,
            rpn_pre_nms_top_n_train=4 * rpn_proposals,
            rpn_post_nms_top_n_train=rpn_proposals,
            rpn_pre_nms_top_n_test=4 * rpn_proposals,
            rpn_post_nms_top_n_test=rpn_proposals,
            rpn_batch_size_per_image=64,
            box_roi_pool=pool,
            box_head=TwoMLPHead(backbone.out_channels * 49, representation),
            box_predictor=FastRCNNPredictor(representation, num_classes + 1),
            box_batch_size_per_image=box_batch_size,
            box_score_thresh=score_threshold,
            box_nms_thresh=nms_iou,
            box_detections_per_img=max_detections,
        )
        self._refresh_anchors()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_anchors())

    def needs_anchors(self) -> bool:
        return bool((self.anchors == 0).all())

    def set_anchors(self, anchors: Tensor) -> None:
        self.anchors.copy_(anchors.to(self.anchors))
        self._refresh_anchors()

    def _refresh_anchors(self) -> None:
        # torchvision's cell anchors: xyxy about 0 (not rounded as its own are: a 1 px tall
        # anchor would become 0 px, and its box encoding log(0)).
        half = self.anchors.clamp_min(1.0) / 2
        cells = torch.cat([-half, half], 1)
        self.detector.rpn.anchor_generator.cell_anchors = [cells]

    def forward(
        self, images: Tensor, boxes: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor] | Detections:
        if boxes is not None and labels is not None:
            targets: list[dict[str, Any]] = []
            for box, label in zip(boxes, labels, strict=True):
                keep = label >= 0
                targets.append({"boxes": box[keep].float(), "labels": label[keep] + 1})
            return self.detector(list(images), targets)
        out = self.detector(list(images))
        return [
            {"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in out
        ]
