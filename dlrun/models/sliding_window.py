"""Sliding-window detection, then the same classifier run as one convolution (OverFeat).

The notes' two steps (滑动窗口, then 卷积实现): a classifier trained on window crops is run over
windows at a stride; then its fully connected layers are read as convolutions, so that one pass
over the whole image scores every window at once.

The classifier: a LeNet-like network over an `input_size` px square crop, two stages of an
unpadded 5x5 convolution (BatchNorm, ReLU) and a 2x2 max pool (total stride T = 4), then fully
connected layers (`hidden`) to K + 1 logits: the K object classes at indices 0..K-1 (the labels
of the data) and background last, at index K. No padding anywhere: a padded convolution would
see zeros at a crop's border but real pixels in the whole image, and the two forms would differ.

Windows: `window` px high at scale 1, one set per `scales` entry (height window x s) and per
`aspects` entry (width / height a: 1.0 the notes' squares; 0.5 fits the narrow "1"s, whose tight
boxes no square window overlaps by IoU 0.5). Each (scale, aspect) is a level of an image pyramid:
the image resized (bilinear) by input_size / (window x s) in height and input_size /
(window x s x a) in width, rounded to whole pixels, so that one window there is input_size x
input_size. Windows step `stride` px of the level (null: T); their boxes in the image's pixels
are the level's divided by its factors.

- Loop form (`convolutional: false`): the level made, then every window cut from it with
  `torchvision.ops.roi_align` (aligned=True, sampling_ratio=1: a whole-pixel window of n px
  into n x n samples the pixel centres themselves, the level's slice) and classified on its own,
  LOOP_CHUNK crops a call. (Cut from the image itself, a crop samples the same points in exact
  arithmetic, but the window's float coordinates move them enough for pixels ~2e-5 apart.)
- Conv form (`convolutional: true`): `convolutional()` turns the first fully connected layer over
  the final (C, h, w) map into a Conv2d with an (h, w) kernel (its weight (out, C*h*w) reshaped to
  (out, C, h, w), the order Flatten reads) and the later ones into 1x1 convolutions: the same
  numbers, no retraining. Run once per level, its output cell (i, j) scores the window at
  (j T, i T) of the level: with stride T both forms score the same windows, to float rounding.

Detections: every window's best class other than background, its probability the score,
per-class NMS (`batched_nms`), `score_threshold`, `max_detections`; a detection's box is its window.

Training (`model(images, boxes, labels)`): crops sampled from each batch's scenes with torch's
global RNG (the checkpoint saves it, so a resumed run draws the same). Positives: `positives`
windows per true box, each of a random aspect, its height that of the smallest such window holding
the box (the box's square for aspect 1) times up to 1.3 either way, its centre shifted up to a
fifth of its size; those with IoU >= `positive_iou` with their box are kept, labelled with its
class (a square about a "1" never is: the narrow aspect learns it). Negatives: `negatives` random
windows per image (sizes around the scales'), kept where their IoU with every true box of the
image is < `negative_iou`, labelled background. (Drawing extra near misses around the boxes as
background cut the confident boxes per image from 35 to 11 but lowered mAP@0.5 after 100 steps,
0.52 against 0.62: left out.) All crops come from one roi_align call over the batch images
(sampling_ratio=1, as inference samples its levels); the loss is their mean cross-entropy, term
"cls".
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import batched_nms, roi_align

from dlrun.errors import UserError

Detections = list[dict[str, Tensor]]
KERNEL, STAGES = 5, 2  # LeNet's unpadded 5x5 convolutions, each followed by a 2x2 max pool
LOOP_CHUNK = 4096  # crops per classifier call in the loop form (bounds its memory)
SIZE_JITTER, SHIFT_JITTER = 1.3, 0.2  # positives: size x [1/1.3, 1.3], centre +- 0.2 of the size


def elementwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of xyxy boxes a (..., 4) and b (..., 4), broadcast (box_iou only pairs two lists)."""
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda box: (box[..., 2:] - box[..., :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp_min(1e-6)


class SlidingWindow(nn.Module):
    """A crop classifier (K classes + background) scored over sliding windows, by a loop over
    crops or by its convolutional form: the detector contract of dlrun/models/yolo.py."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        window: int = 20,
        input_size: int = 20,
        scales: Sequence[float] = (0.75, 1.0, 1.25),
        aspects: Sequence[float] = (1.0, 0.5),
        stride: int | None = None,
        convolutional: bool = True,
        width: int = 16,
        hidden: Sequence[int] = (128,),
        positives: int = 8,
        negatives: int = 16,
        positive_iou: float = 0.5,
        negative_iou: float = 0.5,
        score_threshold: float = 0.01,
        nms_iou: float = 0.5,
        max_detections: int = 100,
    ) -> None:
        super().__init__()
        size = input_size
        for _ in range(STAGES):
            size = (size - KERNEL + 1) // 2
        self.total_stride = 2**STAGES
        stride = self.total_stride if stride is None else stride
        self.k, self.window, self.input_size = num_classes, window, input_size
        self.scales, self.aspects = [float(s) for s in scales], [float(a) for a in aspects]
        self.stride, self.conv_form = stride, convolutional  # (convolutional(): the net)
        self.positives, self.negatives = positives, negatives
        self.positive_iou, self.negative_iou = positive_iou, negative_iou
        self.score_threshold, self.nms_iou = score_threshold, nms_iou
        self.max_detections, self.image_size = max_detections, image_size
        self._check(size)
        layers: list[nn.Module] = []
        cin, cout = in_channels, width
        for _ in range(STAGES):
            layers += [nn.Conv2d(cin, cout, KERNEL, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]  # fmt: skip
            cin, cout = cout, cout * 2
        self.features = nn.Sequential(*layers)
        self.feature_shape = (cin, size, size)  # what the first fully connected layer reads
        dims = [cin * size * size, *hidden, num_classes + 1]
        fc: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            fc += [nn.Linear(a, b)] + ([nn.ReLU(inplace=True)] if i < len(dims) - 2 else [])
        self.head = nn.Sequential(*fc)

    def _check(self, feature_size: int) -> None:
        """One line per mistake, before any weight is made."""
        if feature_size < 1:
            raise UserError(
                f"model.input_size={self.input_size} is too small for the classifier's two 5x5 "
                "convolutions and pools: use model.input_size >= 16."
            )
        if not self.scales or not self.aspects or min(self.scales + self.aspects) <= 0:
            raise UserError(
                f"model.scales and model.aspects must be non-empty lists of positive numbers, "
                f"got {self.scales} and {self.aspects}."
            )
        if self.stride < 1:
            raise UserError(f"model.stride must be >= 1 px (or null: {self.total_stride}), "
                            f"got {self.stride}.")  # fmt: skip
        if self.conv_form and self.stride != self.total_stride:
            raise UserError(
                f"model.convolutional=true scores windows at the network's total stride "
                f"{self.total_stride}: set model.stride=null (or {self.total_stride}), or "
                f"model.convolutional=false for stride {self.stride}."
            )
        if not 0 <= self.negative_iou <= self.positive_iou <= 1:
            raise UserError(
                "model.negative_iou <= model.positive_iou must both lie in [0, 1], got "
                f"{self.negative_iou} and {self.positive_iou}."
            )
        if self.positives < 0 or self.negatives < 0 or self.positives + self.negatives == 0:
            raise UserError(
                "model.positives and model.negatives (crops per box, per image) must be >= 0 "
                f"and not both 0, got {self.positives} and {self.negatives}."
            )
        self.levels(self.image_size, self.image_size)  # a window larger than the image

    # ----- the detector contract of dlrun/models/yolo.py: no anchors to fit ------------------------
    def needs_anchors(self) -> bool:
        return False

    def set_anchors(self, anchors: Tensor) -> None:
        """Nothing to set: the windows are the boxes."""

    # ----- the classifier and its convolutional form ----------------------------------------------
    def classify(self, crops: Tensor) -> Tensor:
        """(N, C, n, n) crops -> (N, K + 1) logits, background last."""
        return self.head(self.features(crops))

    def convolutional_layers(self) -> list[nn.Conv2d]:
        """The fully connected layers as convolutions with the same numbers: the first's weight
        (out, C*h*w) reshaped to (out, C, h, w), the later ones' to (out, in, 1, 1)."""
        convs: list[nn.Conv2d] = []
        linears = [m for m in self.head if isinstance(m, nn.Linear)]
        for i, lin in enumerate(linears):
            cin, h, w = self.feature_shape if i == 0 else (lin.in_features, 1, 1)
            conv = nn.Conv2d(cin, lin.out_features, (h, w), device=lin.weight.device,
                             dtype=lin.weight.dtype)  # fmt: skip
            with torch.no_grad():
                conv.weight.copy_(lin.weight.view(lin.out_features, cin, h, w))
                conv.bias.copy_(lin.bias)
            convs.append(conv)
        return convs

    def convolutional(self) -> nn.Sequential:
        """The whole classifier as a fully convolutional network (the features shared, not
        copied): on an n x n crop its 1 x 1 output is classify(crop); on a larger image, cell
        (i, j) is the crop at (j T, i T)."""
        layers: list[nn.Module] = []
        for conv in self.convolutional_layers():
            layers += [conv, nn.ReLU()]
        return nn.Sequential(self.features, *layers[:-1])

    # ----- windows -----------------------------------------------------------------------------
    def levels(self, height: int, width: int) -> list[tuple[int, int]]:
        """The pyramid's (height, width) per (scale, aspect), scales outer: one window there is
        input_size x input_size."""
        n, out = self.input_size, []
        for s in self.scales:
            for a in self.aspects:
                rh = round(height * n / (self.window * s))
                rw = round(width * n / (self.window * s * a))
                if rh < n or rw < n:
                    raise UserError(
                        f"model.window={self.window} at scale {s}, aspect {a} is a "
                        f"{self.window * s * a:g} x {self.window * s:g} px window, larger than "
                        f"the {width} x {height} px image: use a smaller model.window or "
                        "model.scales."
                    )
                out.append((rh, rw))
        return out

    def grid(self, size: int, stride: int) -> int:
        """Windows along a level's side of `size` px."""
        return (size - self.input_size) // stride + 1

    def corners(self, size: tuple[int, int], stride: int) -> Tensor:
        """(N, 4) float64 xyxy windows of one level of (height, width) px, in its pixels, rows
        then columns: whole pixels, stride apart."""
        n = self.input_size
        y = torch.arange(self.grid(size[0], stride), dtype=torch.float64) * stride
        x = torch.arange(self.grid(size[1], stride), dtype=torch.float64) * stride
        yy, xx = (t.reshape(-1) for t in torch.meshgrid(y, x, indexing="ij"))
        return torch.stack([xx, yy, xx + n, yy + n], 1)

    def windows(self, height: int, width: int, stride: int | None = None) -> Tensor:
        """(N, 4) xyxy windows in the image's pixels, level by level (the order of scores())."""
        out = []
        for rh, rw in self.levels(height, width):
            factor = torch.tensor([rw / width, rh / height] * 2, dtype=torch.float64)
            out.append(self.corners((rh, rw), stride or self.stride) / factor)
        return torch.cat(out).float()

    @staticmethod
    def resized(images: Tensor, size: tuple[int, int]) -> Tensor:
        """One pyramid level: bilinear, pixel centres mapped (align_corners=False)."""
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def loop_scores(self, images: Tensor) -> Tensor:
        """(B, N, K + 1) probabilities: every window cropped and classified on its own."""
        b, n, out = images.shape[0], self.input_size, []
        index = torch.arange(b, device=images.device, dtype=images.dtype)
        for size in self.levels(*images.shape[-2:]):
            level = self.resized(images, size)
            boxes = self.corners(size, self.stride).to(images)
            rois = torch.cat([index.repeat_interleave(len(boxes))[:, None], boxes.repeat(b, 1)], 1)
            # Whole-pixel windows of n px into n x n: one sample per pixel centre, the slice.
            logits = [
                self.classify(roi_align(level, part, n, 1.0, sampling_ratio=1, aligned=True))
                for part in rois.split(LOOP_CHUNK)
            ]
            out.append(torch.cat(logits).float().view(b, len(boxes), -1))
        return torch.cat(out, 1).softmax(-1)

    def conv_scores(self, images: Tensor) -> Tensor:
        """(B, N, K + 1) probabilities: one pass of the convolutional form per pyramid level."""
        net, (h, w), out = self.convolutional(), images.shape[-2:], []
        for rh, rw in self.levels(h, w):
            level = self.resized(images, (rh, rw))
            t = self.total_stride  # floor pooling may leave a cell whose window is not whole
            logits = net(level)[:, :, : self.grid(rh, t), : self.grid(rw, t)]
            out.append(logits.float().flatten(2).transpose(1, 2))
        return torch.cat(out, 1).softmax(-1)

    def scores(self, images: Tensor, convolutional: bool | None = None) -> Tensor:
        """(B, N, K + 1) class probabilities of every window of `windows()`, by either form."""
        conv = self.conv_form if convolutional is None else convolutional
        return self.conv_scores(images) if conv else self.loop_scores(images)

    def cost(self, convolutional: bool, size: int | None = None) -> dict[str, int]:
        """Windows one image of size x size px gets scored and the FLOPs of its convolutions and
        matrix products (torch's FlopCounterMode: resizing and cropping not counted)."""
        size = size or self.image_size
        stride = self.total_stride if convolutional else self.stride
        windows = len(self.windows(size, size, stride))
        first = next(self.parameters())
        image = torch.zeros(1, first.shape[1], size, size, device=first.device)
        modes = {m: m.training for m in self.modules()}  # eval: BatchNorm's statistics kept
        self.eval()
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                self.scores(image, convolutional)
        finally:
            for module, training in modes.items():
                module.training = training
        return {"windows": windows, "flops": int(counter.get_total_flops())}

    # ----- the detector --------------------------------------------------------------------------
    def forward(
        self, images: Tensor, boxes: Tensor | None = None, labels: Tensor | None = None
    ) -> dict[str, Tensor] | Detections:
        if boxes is not None and labels is not None:
            return self.loss(images, boxes, labels)
        return self.detect(images)

    def sample(
        self, boxes: Tensor, labels: Tensor, height: int, width: int
    ) -> tuple[Tensor, Tensor]:
        """Training crops: (R, 5) rois (image index, xyxy) and their (R,) classes, background K."""
        dev, b = boxes.device, boxes.shape[0]
        img, slot = (labels >= 0).nonzero(as_tuple=True)
        gt, cls = boxes[img, slot].float(), labels[img, slot]
        gt, img, cls = (t.repeat_interleave(self.positives, 0) for t in (gt, img, cls))
        pos = self._around(gt, SIZE_JITTER, SHIFT_JITTER, height, width)
        hit = elementwise_iou(pos, gt) >= self.positive_iou
        # Random windows: heights log-uniform over the scales' windows, a fifth either side.
        lo, hi = (self.window * f for f in (min(self.scales) / 1.2, max(self.scales) * 1.2))
        n = b * self.negatives
        h = lo * (hi / lo) ** torch.rand(n, device=dev)
        size = torch.stack([h * self._aspects(n, dev), h], 1)
        room = (torch.tensor([width, height], device=dev) - size).clamp_min(0)
        neg = self._placed(room * torch.rand(n, 2, device=dev), size, height, width)
        neg_img = torch.arange(b, device=dev).repeat_interleave(self.negatives)
        overlap = elementwise_iou(neg[:, None], boxes[neg_img].float())  # (R, M)
        overlap = overlap.masked_fill(labels[neg_img] < 0, 0.0)
        free = (overlap.amax(1) if overlap.shape[1] else overlap.sum(1)) < self.negative_iou
        rois = torch.cat([torch.cat([img[hit], neg_img[free]])[:, None].float(),
                          torch.cat([pos[hit], neg[free]])], 1)  # fmt: skip
        background = torch.full((int(free.sum()),), self.k, device=dev, dtype=cls.dtype)
        return rois, torch.cat([cls[hit], background])

    def _aspects(self, n: int, device: torch.device) -> Tensor:
        """n window aspects (width / height) drawn from model.aspects."""
        aspects = torch.tensor(self.aspects, device=device)
        return aspects[torch.randint(len(aspects), (n,), device=device)]

    def _around(
        self, gt: Tensor, size_jitter: float, shift_jitter: float, height: int, width: int
    ) -> Tensor:
        """One window per box of (G, 4) `gt`: of a random aspect, as high as the smallest such
        window holding the box (for aspect 1 the box's square), times up to `size_jitter`
        either way, its centre moved up to `shift_jitter` of its size; moved inside the image."""
        g, dev = len(gt), gt.device
        a = self._aspects(g, dev)
        bw, bh = (gt[:, 2] - gt[:, 0]), (gt[:, 3] - gt[:, 1])
        log_scale = math.log(size_jitter) * (2 * torch.rand(g, device=dev) - 1)
        h = torch.maximum(bh, bw / a) * log_scale.exp()
        size = torch.stack([h * a, h], 1)
        centre = (gt[:, :2] + gt[:, 2:]) / 2
        centre = centre + shift_jitter * size * (2 * torch.rand(g, 2, device=dev) - 1)
        return self._placed(centre - size / 2, size, height, width)

    @staticmethod
    def _placed(corner: Tensor, size: Tensor, height: int, width: int) -> Tensor:
        """xyxy boxes of `size` (no larger than the image) moved inside it, not shrunk."""
        limit = torch.tensor([width, height], device=size.device)
        size = torch.minimum(size, limit)
        corner = torch.minimum(corner.clamp_min(0), limit - size)
        return torch.cat([corner, corner + size], 1)

    def loss(self, images: Tensor, boxes: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """{"cls": mean cross-entropy of the sampled crops}."""
        rois, target = self.sample(boxes, labels, *images.shape[-2:])
        if not len(rois):  # nothing sampled: a zero that still reaches the weights
            return {"cls": sum(p.sum() for p in self.parameters()) * 0.0}
        n = self.input_size
        crops = roi_align(images, rois.to(images.dtype), n, 1.0, sampling_ratio=1, aligned=True)
        return {"cls": F.cross_entropy(self.classify(crops).float(), target)}

    @torch.no_grad()
    def detect(self, images: Tensor) -> Detections:
        """Per image: windows whose best object class beats score_threshold, per-class NMS."""
        h, w = images.shape[-2:]
        probs = self.scores(images)
        scores, labels = probs[..., : self.k].max(-1)  # (B, N): background never a detection
        boxes = self.windows(h, w).to(images.device)
        out: Detections = []
        # One NMS call per image: an untrained net puts hundreds of windows of each image above
        # the threshold, and one call over a batch's (image, class) groups loops over them all.
        for score, label in zip(scores, labels, strict=True):
            keep = score > self.score_threshold
            box, score, label = boxes[keep], score[keep], label[keep]
            best = batched_nms(box, score, label, self.nms_iou)[: self.max_detections]
            out.append({"boxes": box[best], "scores": score[best], "labels": label[best]})
        return out
