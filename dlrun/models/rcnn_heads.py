"""R-CNN's parts (dlrun/models/rcnn.py): the warp of a proposal to the CNN's fixed input, the small
CNN run on every warped region, and the targets and losses of the per-class linear SVMs and the
class-specific box regressors (Girshick et al. 2014, section 2.3 and appendices B and C).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from dlrun.models.regions import Regions, encode
from dlrun.models.yolo import conv_bn

SVM_NEGATIVE_IOU = 0.3  # the paper's: below it with every instance of a class, a negative of it
BOX_IOU = 0.6  # the paper's: proposals this close to a true box learn to regress onto it
FEATURE_NORM = 20.0  # the L2 norm of the features the SVMs and regressors read (rcnn's code)


def with_context(boxes: Tensor, input_size: int, context: int) -> Tensor:
    """The paper's context padding: the xyxy box grown about its centre so that, once warped to
    input_size, the original box fills the inner input_size - 2 * context pixels and `context`
    pixels of its surroundings lie on each side (the paper: 16 at 227)."""
    if context == 0:
        return boxes
    grow = input_size / (input_size - 2 * context)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (grow / 2)
    return torch.cat([centre - half, centre + half], 1)


def warp(images: Tensor, image: Tensor, boxes: Tensor, input_size: int, context: int = 0) -> Tensor:
    """Each xyxy box of images[image] cropped (with context) and resized anisotropically to
    input_size x input_size, all regions in one batched call: (N, C, input_size, input_size).

    roi_align with aligned=True treats pixel i as covering [i, i + 1), so a box equal to the
    image reproduces it. sampling_ratio=0 (adaptive, ceil(box side / input_size) bilinear samples
    per output pixel and side) rather than 2: for a box no larger than the input it is exactly a
    bilinear resize (2 x 2 samples at +-1/4 px would blur even the identity warp into
    3/4 p_i + 1/8 (p_i-1 + p_i+1)), and a larger box is averaged over more samples (anti-aliased).
    Outside the image roi_align reads 0, the data's mean once normalised: the paper pads with
    the image mean too."""
    rois = torch.cat([image[:, None].to(boxes), with_context(boxes, input_size, context)], 1)
    return roi_align(
        images, rois.to(images.dtype), output_size=input_size, spatial_scale=1.0,
        sampling_ratio=0, aligned=True,
    )  # fmt: skip


class RegionCNN(nn.Module):
    """A LeNet-size CNN for the warped regions: three conv-BN-LeakyReLU + max-pool stages (width,
    2 width, 4 width channels), then one hidden layer, the penultimate `features` (the paper's
    fc7, which its SVMs and, here, its box regressors read), and the (K + 1)-way softmax layer
    that fine-tuning trains (class 0: background)."""

    def __init__(
        self, in_channels: int, width: int, input_size: int, features: int, num_classes: int
    ) -> None:
        super().__init__()
        side = input_size // 8
        self.convs = nn.Sequential(
            conv_bn(in_channels, width), nn.MaxPool2d(2),
            conv_bn(width, 2 * width), nn.MaxPool2d(2),
            conv_bn(2 * width, 4 * width), nn.MaxPool2d(2),
            nn.Flatten(),
        )  # fmt: skip
        self.hidden = nn.Sequential(nn.Linear(4 * width * side * side, features), nn.ReLU())
        self.classify = nn.Linear(features, num_classes + 1)

    def forward(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (N, K + 1), features (N, F)) of warped regions."""
        features = self.hidden(self.convs(regions))
        return self.classify(features), features


def unit(features: Tensor) -> Tensor:
    """What the linear SVMs and box regressors read: each region's features scaled to L2 norm
    FEATURE_NORM (the authors' code scales them to a mean norm of 20): a linear model's output
    moves ~lr x sum |f| an Adam step, so the norm sets the SVMs' pace. Fitted to the frozen
    features of a 60-step CNN, they reached mAP@0.5 0.80 in ~300 steps at norm 1, ~60 at 20."""
    return F.normalize(features, dim=1) * FEATURE_NORM


def svm_hinge(scores: Tensor, targets: Tensor) -> Tensor:
    """One-vs-rest hinge of K linear SVMs: per region, sum over classes of max(0, 1 - y_c s_c),
    y_c = +1 / -1, classes with target 0 (neither) left out; mean over the regions. (dlrun's
    classification hinge is the Weston-Watkins multiclass form, sum_{j != y} max(0, s_j - s_y +
    1): a different loss, and models import no task package, so it is written here.)"""
    per = (1 - targets * scores).clamp_min(0) * (targets != 0)
    return per.sum() / max(len(scores), 1)


def pick(regions: Regions, rows: Tensor) -> Regions:
    """The regions of `rows` (a minibatch's sample)."""
    fields = (regions.image, regions.boxes, regions.labels, regions.truth, regions.iou)
    return Regions(*(f[rows] for f in fields))


def svm_targets(
    regions: Regions, truth_class: Tensor, boxes: Tensor, labels: Tensor, num_classes: int
) -> Tensor:
    """(N, K) targets of the per-class SVMs, the paper's: +1 for a true box of class c (only
    those: proposals are never positives), -1 for a region whose IoU with every instance of c in
    its image is below 0.3, 0 (left out) between. `truth_class` (N,): the class of a true box
    label_regions appended (add_truth=True), -1 for a proposal; `boxes`, `labels` the batch's
    padded truth, which the IoUs are measured against."""
    present = labels >= 0
    gimg = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)[present]
    gbox, glab = boxes[present].float(), labels[present]
    n = len(regions.boxes)
    best = regions.boxes.new_zeros(n, num_classes)
    if len(gbox) and n:
        iou = box_iou(regions.boxes, gbox)
        iou = torch.where(regions.image[:, None] == gimg[None, :], iou, 0.0)
        # The best IoU with an instance of each class: (N, G) reduced by the truths' class.
        best = best.scatter_reduce(1, glab[None, :].expand(n, -1), iou, "amax")
    targets = torch.where(best < SVM_NEGATIVE_IOU, -1.0, 0.0)
    rows = (truth_class >= 0).nonzero().squeeze(1)
    targets[rows, truth_class[rows]] = 1.0
    return targets


def box_targets(regions: Regions, truth_class: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's regression set: proposals (not the appended true boxes: truth_class -1) with
    IoU >= 0.6 with a true box; (rows, class 0..K-1, targets (n, 4)), the targets R-CNN's
    t = encode(P, G) with Fast R-CNN's (10, 10, 5, 5) scale, so that the four have about unit
    spread."""
    rows = ((regions.iou >= BOX_IOU) & (truth_class < 0)).nonzero().squeeze(1)
    targets = encode(regions.boxes[rows], regions.truth[rows])
    return rows, regions.labels[rows] - 1, targets


def box_loss(deltas: Tensor, rows: Tensor, classes: Tensor, targets: Tensor) -> Tensor:
    """Least squares (the paper's ridge regression, without its penalty: rcnn.py adds it) of
    the regressor of each row's class: sum over the four coordinates, mean over the rows."""
    chosen = deltas[rows].view(len(rows), -1, 4)[torch.arange(len(rows)), classes]
    if len(rows) == 0:
        return deltas.sum() * 0.0  # keeps the graph: every term is a tensor of the model
    return F.mse_loss(chosen, targets, reduction="sum") / len(rows)
