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
- "box": class-specific linear regression of the (10, 10, 5, 5)-scaled R-CNN targets from the
  penultimate features (the paper reads pool5; here the features the SVMs read), on proposals
  with IoU >= 0.6, least squares plus `box_ridge` ||W||^2.
Both read each region's features scaled to L2 norm 20 (heads.unit; the authors' code scales
them to a mean norm of 20): on raw ReLU features a 60-step run's SVM margins averaged -14.
Departures from the paper, stated:
- It trains the SVMs and regressors after fine-tuning, on frozen features cached on disk per
  image. Here they learn at the same time, on the DETACHED features of the CNN as it is now
  (gradients of "svm" and "box" never reach the CNN), recomputed every step because the CNN
  keeps learning (a cache would be stale after one step).
- Those features are the fine-tuning minibatch's own (one CNN pass a step, in train mode): the
  SVMs see the sampled regions, not every negative of the training set, and the paper's
  hard-negative mining is skipped; a true box is a positive in the steps that sample it.
- What it costs, measured (500 training scenes, batch 16, 300 steps, 200 validation scenes):
  the SVMs scored mAP@0.5 0.75 where the CNN's own softmax, on the same features, scored 0.91.
  The SVMs lag a CNN that keeps moving: fitted to a CNN's frozen features they reach its
  softmax's score in ~60 steps. `model.stage=heads` is the paper's order: a second run, started
  from the joint run's checkpoint (`ckpt=`), trains the SVMs and regressors alone on the frozen
  CNN (eval mode, no gradient, no "cnn" term).

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
from dlrun.models.regions import decode, label_regions, proposal_settings, sample
from dlrun.models.yolo import Detections

# joint: the three parts learn together; heads: the paper's later stages, the SVMs and box
# regressors alone on a fine-tuned CNN's frozen features (a run started from ckpt=<joint run>).
STAGES = ("joint", "heads")


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
        stage: str = "joint",
        score_threshold: float = 0.01,
        nms_iou: float = 0.3,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        check(input_size, context, svm_c, box_ridge, regions_per_image, positive_fraction, chunk)
        settings = proposal_settings(proposals)
        if stage not in STAGES:
            raise UserError(f"model.stage must be one of {', '.join(STAGES)}, got {stage}.")
        self.proposal_settings, self.stage = settings, stage
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
        """What the SVMs and regressors read of regions (N, F): the CNN's penultimate features
        at norm 20 (heads.unit), warped and run `chunk` regions at a time."""
        out = [
            heads.unit(self.cnn(self.warp(images, i, b))[1])
            for i, b in zip(image.split(self.chunk), boxes.split(self.chunk), strict=True)
        ]
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
        # Each region's class if it is one of the true boxes label_regions appended (after the
        # valid proposals, in the padded batch's order), else -1.
        truth_class = torch.full_like(regions.labels, -1)
        truth_class[len(truth_class) - int((labels >= 0).sum()) :] = labels[labels >= 0]
        # One CNN pass over a 25%-foreground sample of the batch's regions: its softmax is the
        # "cnn" term; its detached features feed the SVMs and the regressors.
        keep = sample(regions.labels, self.regions_per_image * len(images), self.positive_fraction)
        regions, truth_class = heads.pick(regions, keep), truth_class[keep]
        terms: dict[str, Tensor] = {}
        if self.stage == "heads":  # frozen: eval-mode BatchNorm, no gradient, no "cnn" term
            self.cnn.eval()
            with torch.no_grad():
                _, feats = self.cnn(self.warp(images, regions.image, regions.boxes))
        else:
            logits, feats = self.cnn(self.warp(images, regions.image, regions.boxes))
            terms["cnn"] = (
                F.cross_entropy(logits, regions.labels) if len(keep) else logits.sum() * 0.0
            )
        feats = heads.unit(feats.detach())
        targets = heads.svm_targets(regions, truth_class, boxes, labels, self.k)
        svm = heads.svm_hinge(self.svm(feats), targets)
        rows, classes, deltas = heads.box_targets(regions, truth_class)
        box = heads.box_loss(self.box(feats), rows, classes, deltas)
        return terms | {
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
        # One NMS call per image, its classes apart: a whole batch's (image, class) groups in one
        # call take torchvision's per-group loop on the CPU (K x B scans of every candidate,
        # ~10 s for 200 scenes), one image's few hundred candidates its one-call offset trick.
        counts = torch.bincount(img, minlength=b).tolist()
        out: Detections = []
        for bx, sc, lb in zip(*(t.split(counts) for t in (box, score, label)), strict=True):
            mine = batched_nms(bx, sc, lb, self.nms_iou)[: self.max_detections]  # best first
            out.append({"boxes": bx[mine], "scores": sc[mine], "labels": lb[mine]})
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
