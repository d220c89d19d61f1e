"""R-CNN (Girshick et al. 2014): selective-search proposals, each WARPED to a small CNN's fixed
input and run through it, then one linear SVM per class on the CNN's features, class-specific
linear box regression and per-class NMS.

Per warped region (rcnn_heads.warp: the box with `context` pixels of its surroundings, resized
anisotropically by roi_align) the CNN runs once: there is no shared per-image feature map (that
is what Fast R-CNN removes, and here what it costs: every proposal is a forward pass).

Training, the paper's three stages in dlrun's one loop (so that checkpoints and resume stay
exact), each a loss term the detection trainer sums:
- "cnn": fine-tuning as a (K + 1)-way softmax classifier on proposals and the true boxes:
  IoU >= 0.5 its class, otherwise background; `regions_per_image` x B regions a minibatch, 25%
  foreground (the paper: 128 with 32 positive), drawn from torch's global RNG.
- "svm": K linear SVMs (one Linear(features, K)), one-vs-rest hinge: positives the true boxes
  only, negatives regions with IoU < 0.3 with every instance of the class, plus `svm_c` ||W||^2.
  The paper's hard-negative mining is skipped: every negative of the batch counts (a scene has
  ~30 proposals, so the whole set fits in a step).
- "box": class-specific linear regression of the (10, 10, 5, 5)-scaled R-CNN targets from the
  penultimate features (the paper reads pool5; here the features the SVMs read), on proposals
  with IoU >= 0.6, least squares plus `box_ridge` ||W||^2.
Departure from the paper, stated: it trains the SVMs and regressors after fine-tuning, on
frozen features cached on disk per image. Here they learn at the same time on DETACHED features
of the CNN as it is now (gradients of "svm" and "box" never reach the CNN), recomputed every step
because the CNN keeps learning; those features come from the CNN in eval mode (BatchNorm's
running statistics), as inference computes them, over every proposal and true box of the batch.

Inference: every valid proposal warped and run through the CNN (chunks of `chunk` regions), SVM
score per class -> sigmoid(margin) (a score in [0, 1], 0.5 at the SVM's boundary; mAP only needs
the ranking), the class's box regression applied, clipped, per-class NMS at IoU 0.3 (the
paper's), `score_threshold`, `max_detections`.

The detector contract of dlrun/tasks/detection/trainer.py: `proposal_settings` (selective
search's keywords: the trainer attaches proposals to the data), train mode `model(images, boxes,
labels, proposals=P)` -> {"cnn", "svm", "box"}, eval mode `model(images, proposals=P)` -> per image
"boxes", "scores", "labels" 0..K-1.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from dlrun.errors import UserError
from dlrun.models import rcnn_heads as heads
from dlrun.models.regions import decode, label_regions, sample
from dlrun.models.yolo import Detections

PROPOSAL_KEYS = ("upscale", "max_boxes", "strategy")  # selective_search's keywords


class RCNN(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        input_size: int = 32,
        context: int = 2,
        width: int = 16,
        features: int = 128,
        regions_per_image: int = 16,
        positive_fraction: float = 0.25,
        svm_c: float = 1e-4,
        box_ridge: float = 1e-3,
        proposals: Mapping[str, Any] | None = None,
        chunk: int = 4096,
        score_threshold: float = 0.01,
        nms_iou: float = 0.3,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        check(input_size, context, svm_c, box_ridge, regions_per_image, positive_fraction, chunk)
        settings = dict(proposals if proposals is not None else {})
        unknown = sorted(set(settings) - set(PROPOSAL_KEYS))
        if unknown:
            raise UserError(
                f"model.proposals takes {', '.join(PROPOSAL_KEYS)}, not {', '.join(unknown)}."
            )
        self.proposal_settings = settings
        self.k, self.size = num_classes, image_size
        self.input_size, self.context, self.chunk = input_size, context, chunk
        self.regions_per_image, self.positive_fraction = regions_per_image, positive_fraction
        self.svm_c, self.box_ridge = svm_c, box_ridge
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.max_detections = max_detections
        self.cnn = heads.RegionCNN(in_channels, width, input_size, features, num_classes)
        self.svm = nn.Linear(features, num_classes)
        self.box = nn.Linear(features, 4 * num_classes)
        nn.init.zeros_(self.box.weight)  # regression starts at "no move": the proposal itself
        nn.init.zeros_(self.box.bias)

    # No anchors: the detection trainer asks every detector, R-CNN answers "none needed".
    def needs_anchors(self) -> bool:
        return False

    def set_anchors(self, anchors: Tensor) -> None:
        """No anchors to set."""

    def warp(self, images: Tensor, image: Tensor, boxes: Tensor) -> Tensor:
        return heads.warp(images, image, boxes, self.input_size, self.context)

    @torch.no_grad()
    def features(self, images: Tensor, image: Tensor, boxes: Tensor) -> Tensor:
        """Penultimate features (N, F) of regions, in chunks, by the CNN in eval mode."""
        was = self.cnn.training
        self.cnn.eval()
        out = [
            self.cnn(self.warp(images, i, b))[1]
            for i, b in zip(image.split(self.chunk), boxes.split(self.chunk), strict=True)
        ]
        self.cnn.train(was)
        return torch.cat(out) if out else images.new_zeros(0, self.svm.in_features)

    def forward(
        self,
        images: Tensor,
        boxes: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        proposals: Tensor | None = None,
    ) -> dict[str, Tensor] | Detections:
        training = boxes is not None and labels is not None
        if proposals is None and training:
            raise UserError(
                "model=rcnn trains on selective-search proposals: call it with proposals= "
                "(the detection trainer attaches them to data=mnist_det)."
            )
        if proposals is None:
            # The whole canvas as each image's one region: what the run folder's FLOP count (a
            # blank image, no proposals) measures: ONE warped region; an image costs that times
            # its proposals (~30 on the digit scenes).
            whole = images.new_tensor([0.0, 0.0, self.size, self.size])
            proposals = whole.expand(len(images), 1, 4)
        if training:
            return self.losses(images, boxes, labels, proposals)
        return self.detect(images, proposals)

    def losses(
        self, images: Tensor, boxes: Tensor, labels: Tensor, proposals: Tensor
    ) -> dict[str, Tensor]:
        regions = label_regions(
            proposals, boxes, labels, fg_iou=0.5, bg_iou=(0.0, 0.5), add_truth=True
        )
        n_proposals = int((proposals[..., 2] > proposals[..., 0]).sum())
        is_truth = torch.arange(len(regions.boxes), device=images.device) >= n_proposals
        # "cnn": the softmax fine-tuning on a 25%-foreground sample of the batch's regions.
        keep = sample(regions.labels, self.regions_per_image * len(images), self.positive_fraction)
        logits, _ = self.cnn(self.warp(images, regions.image[keep], regions.boxes[keep]))
        cnn = F.cross_entropy(logits, regions.labels[keep]) if len(keep) else logits.sum() * 0.0
        # "svm" and "box": every region's detached features, the CNN's current ones.
        feats = self.features(images, regions.image, regions.boxes)
        targets = heads.svm_targets(regions, is_truth, boxes, labels, self.k)
        svm = heads.svm_hinge(self.svm(feats), targets)
        rows, classes, deltas = heads.box_targets(regions, is_truth)
        box = heads.box_loss(self.box(feats), rows, classes, deltas)
        return {
            "cnn": cnn,
            "svm": svm + self.svm_c * self.svm.weight.square().sum(),
            "box": box + self.box_ridge * self.box.weight.square().sum(),
        }

    @torch.no_grad()
    def detect(self, images: Tensor, proposals: Tensor) -> Detections:
        """Per image: class-specific boxes scored by their class's SVM, after per-class NMS."""
        regions = label_regions(proposals)
        n, b = len(regions.boxes), len(images)
        feats = self.features(images, regions.image, regions.boxes)
        scores = self.svm(feats).sigmoid()  # (N, K)
        moved = decode(regions.boxes, self.box(feats).view(n, self.k, 4))  # (N, K, 4)
        moved = clip_boxes_to_image(moved, (self.size, self.size))
        label = torch.arange(self.k, device=images.device).expand(n, -1)
        img = regions.image[:, None].expand(n, self.k)
        keep = scores >= self.score_threshold
        box, score, label, img = moved[keep], scores[keep], label[keep], img[keep]
        # One NMS call for the whole batch: the group is (image, class).
        kept = batched_nms(box, score, img * self.k + label, self.nms_iou)
        out: Detections = []
        for i in range(b):
            mine = kept[img[kept] == i][: self.max_detections]  # batched_nms sorts by score
            out.append({"boxes": box[mine], "scores": score[mine], "labels": label[mine]})
        return out


def check(
    input_size: int,
    context: int,
    svm_c: float,
    box_ridge: float,
    regions_per_image: int,
    positive_fraction: float,
    chunk: int,
) -> None:
    """One clear line for each setting R-CNN cannot run with."""
    if input_size < 8:
        raise UserError(
            f"model.input_size must be at least 8 (three 2x poolings), got {input_size}."
        )
    if not 0 <= 2 * context < input_size:
        raise UserError(
            f"model.context must be in [0, input_size / 2) pixels, got {context} "
            f"(input_size {input_size})."
        )
    if svm_c < 0 or box_ridge < 0:
        raise UserError(
            f"model.svm_c and model.box_ridge are L2 penalties, >= 0: got {svm_c}, {box_ridge}."
        )
    if regions_per_image < 1 or chunk < 1:
        raise UserError(
            f"model.regions_per_image and model.chunk must be >= 1, got {regions_per_image}, "
            f"{chunk}."
        )
    if not 0 < positive_fraction <= 1:
        raise UserError(f"model.positive_fraction must be in (0, 1], got {positive_fraction}.")
