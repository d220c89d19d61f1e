"""Samplers and key-aware transforms: exact mid-epoch replay, their invariants, and the old loader."""

import io
import math
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dlrun.data import (
    ClassBalancedSampler,
    Normalize,
    RandomCrop,
    RandomHFlip,
    RandomSampler,
    SequentialSampler,
    ShardedSampler,
    TensorLoader,
    UnpairedSampler,
)
from dlrun.data.pairs import PairSampler
from dlrun.errors import UserError

CPU = torch.device("cpu")
# Replay and the old-loader comparison also run on CUDA where there is one (generators on the GPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N, SIZE = 23, 8


def detection_data(n: int = N, size: int = SIZE, seed: int = 0) -> dict[str, Tensor]:
    """Images with one or two bright squares, the mask of them, their boxes, one padding box."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    boxes = torch.zeros(n, 3, 4)
    labels = torch.full((n, 3), -1, dtype=torch.int64)
    for i in range(n):
        for j in range(1 + i % 2):
            s = int(torch.randint(1, 4, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
            image[i, :, y : y + s, x : x + s] = 200
            boxes[i, j] = torch.tensor([x, y, x + s, y + s], dtype=torch.float32)
            labels[i, j] = j
    image += torch.randint(0, 50, image.shape, generator=g, dtype=torch.uint8)  # no overflow
    return {
        "image": image,
        "label": torch.arange(n) % 5,
        "mask": (image[:, 0] > 150).long(),
        "boxes": boxes,
        "box_labels": labels,
    }


def consume(batch: dict[str, Tensor], aug: torch.Generator) -> None:
    """What a trainer step does with the aug generator between batches (a GAN's noise)."""
    torch.rand(3, device=aug.device, generator=aug)


# name -> (tensors, sampler, transforms, groups); each replayed with and without a shared generator
def _cases() -> dict[str, Callable[[], tuple]]:
    d = detection_data()
    image_only = {"image": d["image"], "label": d["label"]}
    unpaired = {"image": d["image"], "image_b": d["image"][:9].flip(1)}
    norm = Normalize([0.5] * 3, [0.25] * 3)
    return {
        "sequential": lambda: (image_only, SequentialSampler(N, 5), [norm], None),
        "random": lambda: (image_only, RandomSampler(N, 5), [norm], None),
        "random_drop_last": lambda: (image_only, RandomSampler(N, 5, drop_last=True), [], None),
        "class_balanced": lambda: (image_only, ClassBalancedSampler(d["label"], 3, 2), [], None),
        "unpaired": lambda: (
            unpaired,
            UnpairedSampler(N, 9, 4),
            [],
            {"image": "a", "image_b": "b"},
        ),
        "pairs": lambda: (
            {**image_only, "image_b": d["image"], "label_b": d["label"]},
            PairSampler(d["label"], 6),
            [RandomCrop(padding=2), RandomHFlip(keys=["image_b"])],
            {"image": "a", "label": "a", "image_b": "b", "label_b": "b"},
        ),
        "sharded": lambda: (image_only, ShardedSampler(RandomSampler(N, 7), 1, 3), [], None),
        "crop_padding": lambda: (image_only, RandomSampler(N, 5), [RandomCrop(padding=2)], None),
        "crop_padding_keys": lambda: (d, RandomSampler(N, 5), [RandomCrop(padding=2)], None),
        "crop_size": lambda: (image_only, RandomSampler(N, 5), [RandomCrop(5, padding=1)], None),
        "crop_size_keys": lambda: (d, RandomSampler(N, 5), [RandomCrop(5, padding=1)], None),
        "hflip": lambda: (image_only, RandomSampler(N, 5), [RandomHFlip()], None),
        "hflip_keys": lambda: (d, RandomSampler(N, 5), [RandomHFlip(), norm], None),
    }


def _gens(shared: bool, seed: int, device: str = "cpu") -> tuple[torch.Generator, torch.Generator]:
    order = torch.Generator(device).manual_seed(seed)
    return order, order if shared else torch.Generator(device).manual_seed(seed + 1)


def _epoch(batches: Iterable[dict[str, Tensor]], aug: torch.Generator) -> list[dict[str, Tensor]]:
    out = []
    for batch in batches:
        consume(batch, aug)
        out.append(batch)
    return out


def _assert_same(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True], ids=["two_generators", "one_generator"])
@pytest.mark.parametrize("case", list(_cases()))
def test_resume_mid_epoch_replays_bit_for_bit(case: str, shared: bool, device: str) -> None:
    tensors, sampler, transforms, groups = _cases()[case]()
    tensors = {k: t.to(device) for k, t in tensors.items()}

    def loader(order: torch.Generator, aug: torch.Generator) -> TensorLoader:
        return TensorLoader(
            tensors, sampler, transforms=transforms, groups=groups,
            order_generator=order, aug_generator=aug,
        )  # fmt: skip

    order, aug = _gens(shared, 1, device)
    straight = loader(order, aug)
    _epoch(straight, aug)  # resume inside the second epoch, not from the seed
    first = _epoch(straight, aug)
    end = (order.get_state(), aug.get_state())
    second = _epoch(straight, aug)
    assert len(first) == len(sampler) >= 3

    order, aug = _gens(shared, 1, device)
    cut = loader(order, aug)
    _epoch(cut, aug)
    batches, head = cut.iterate(), []
    for _ in range(2):
        head.append(next(batches))
        consume(head[-1], aug)
    buffer = io.BytesIO()
    torch.save(cut.position(), buffer)
    buffer.seek(0)
    position = torch.load(buffer, weights_only=True)
    assert position["batch"] == 2

    order, aug = _gens(shared, 99, device)  # a fresh process: generators somewhere else entirely
    torch.rand(5, device=aug.device, generator=aug)
    resumed = loader(order, aug)
    tail = _epoch(resumed.iterate(resume=position), aug)
    _assert_same(head + tail, first)
    assert torch.equal(order.get_state(), end[0]) and torch.equal(aug.get_state(), end[1])
    assert resumed.position()["batch"] == len(sampler)
    _assert_same(_epoch(resumed, aug), second)


def test_resume_at_the_epoch_edges() -> None:
    """position() before the first batch starts the epoch afresh; after the last, ends it."""
    x = torch.arange(10)
    order, aug = _gens(False, 3)
    loader = TensorLoader({"x": x}, RandomSampler(10, 4), order_generator=order, aug_generator=aug)
    fresh = loader.position()
    straight = [b["x"] for b in loader]
    done = loader.position()
    again = [b["x"] for b in loader.iterate(resume=fresh)]
    assert len(again) == len(straight) == 3
    assert all(torch.equal(a, b) for a, b in zip(again, straight, strict=True))
    assert list(loader.iterate(resume=done)) == [] and loader.position()["batch"] == 3


def test_class_balanced_batches_are_p_classes_of_k() -> None:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([9, 5, 2, 7, 4, 30])])
    sampler = ClassBalancedSampler(labels, p=4, k=3)
    assert len(sampler) == len(labels) // 12
    batches = sampler.epoch(torch.Generator().manual_seed(0), CPU)
    seen = set()
    for batch in batches:
        idx = batch["main"]
        groups = labels[idx].view(4, 3)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 4
        seen |= set(groups[:, 0].tolist())
        for c, members in zip(groups[:, 0].tolist(), idx.view(4, 3), strict=True):
            if c != 2:  # class 2 has 2 items < k: drawn with replacement; the rest without
                assert len(set(members.tolist())) == 3
    assert len(seen) > 4  # classes are drawn at random, not the same four every time
    assert len(ClassBalancedSampler(labels, 2, 2, batches_per_epoch=7)) == 7
    with pytest.raises(UserError, match=r"p=7 distinct classes but the data has only 6"):
        ClassBalancedSampler(labels, p=7, k=2)


@pytest.mark.parametrize(("n_a", "n_b"), [(10, 4), (3, 11), (6, 6)])
def test_unpaired_epoch_covers_the_larger_domain(n_a: int, n_b: int) -> None:
    sampler = UnpairedSampler(n_a, n_b, 4)
    assert len(sampler) == math.ceil(max(n_a, n_b) / 4)
    batches = sampler.epoch(torch.Generator().manual_seed(0), CPU)
    a, b = (torch.cat([batch[g] for batch in batches]) for g in ("a", "b"))
    big, small, n_small = (a, b, n_b) if n_a >= n_b else (b, a, n_a)
    assert sorted(big.tolist()) == list(range(max(n_a, n_b))) and big.tolist() != sorted(big)
    assert len(small) == len(big) and 0 <= small.min() and small.max() < n_small


@pytest.mark.parametrize(("batch", "world"), [(12, 3), (10, 4), (7, 2)])
def test_sharded_ranks_split_every_global_batch(batch: int, world: int) -> None:
    inner = RandomSampler(31, batch)
    global_batches = inner.epoch(torch.Generator().manual_seed(5), CPU)
    shards = [
        ShardedSampler(inner, r, world).epoch(torch.Generator().manual_seed(5), CPU)
        for r in range(world)
    ]
    assert all(len(s) == len(inner) for s in shards)
    for i, whole in enumerate(global_batches):
        parts = [s[i]["main"] for s in shards]
        assert torch.equal(torch.cat(parts), whole["main"])  # disjoint, contiguous, complete
        sizes = [len(p) for p in parts]
        assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    assert ShardedSampler(inner, 0, world).batch_size == -(-batch // world)


def _check_consistent(out: dict[str, Tensor], original: dict[str, Tensor]) -> None:
    """The mask is still the image's bright pixels; valid boxes are exactly the bright squares."""
    bright = out["image"][:, 0] > 150
    assert torch.equal(out["mask"].bool(), bright)
    for i in range(len(bright)):
        cover = torch.zeros_like(bright[i])
        for box, label in zip(out["boxes"][i], out["box_labels"][i], strict=True):
            if label >= 0:
                x1, y1, x2, y2 = (int(v) for v in box)
                assert x2 > x1 and y2 > y1 and bright[i, y1:y2, x1:x2].all()
                cover[y1:y2, x1:x2] = True
        assert torch.equal(cover, bright[i])
    assert ((out["box_labels"] == -1) >= (original["box_labels"] == -1)).all()  # padding stays


@pytest.mark.parametrize("size", [None, 5, 3])
def test_crop_and_flip_keep_masks_and_boxes_on_the_image(size: int | None) -> None:
    data = detection_data(n=64)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = RandomHFlip()(RandomCrop(size, padding=2)(data, g), g)
        assert out["image"].shape[-1] == (size or SIZE) == out["mask"].shape[-1]
        _check_consistent(out, data)
    flipped = RandomHFlip(p=1.0)(data, g)
    assert torch.equal(flipped["image"], data["image"].flip(3))
    _check_consistent(flipped, data)


def test_a_box_cropped_out_is_marked_minus_one() -> None:
    image = torch.zeros(40, 1, 8, 8, dtype=torch.uint8)
    image[:, :, 0, 0] = 255  # a 1-pixel box in the top-left corner of every image
    batch = {
        "image": image,
        "boxes": torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]).repeat(40, 1, 1),
        "box_labels": torch.ones(40, 1, dtype=torch.int64),
    }
    out = RandomCrop(4)(batch, torch.Generator().manual_seed(0))
    kept = out["image"].flatten(1).amax(1) > 0  # the window still holds the bright pixel
    assert torch.equal(out["box_labels"][:, 0] == 1, kept) and 0 < kept.sum() < 40
    assert torch.equal(out["box_labels"][:, 0] == -1, ~kept)


def test_a_crop_larger_than_the_padded_image_is_refused() -> None:
    with pytest.raises(UserError, match="crop of 12x12 does not fit in 8x8 images padded by 1"):
        RandomCrop(12, padding=1)({"image": torch.zeros(2, 1, 8, 8)}, None)


# The loader as it was before samplers and key-aware transforms (one shared generator).
def old_random_crop(x: Tensor, padding: int, generator: torch.Generator | None) -> Tensor:
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4).permute(0, 2, 3, 1)
    shift = torch.randint(0, 2 * padding + 1, (2, b), device=x.device, generator=generator)
    rows = shift[0, :, None] + torch.arange(h, device=x.device)
    cols = shift[1, :, None] + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def old_random_hflip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def old_epoch(x, y, batch_size, mean, std, padding, hflip, generator):
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
    order = torch.randperm(len(x), device=x.device, generator=generator)
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x[idx], y[idx]
        if padding:
            xb = old_random_crop(xb, padding, generator)
        if hflip:
            xb = old_random_hflip(xb, generator)
        yield torch.addcmul(shift, xb.float(), scale), yb


@pytest.mark.parametrize("device", DEVICES)
def test_the_new_loader_reproduces_the_old_one_bit_for_bit(device: str) -> None:
    x = torch.randint(0, 256, (50, 3, 6, 6), generator=torch.Generator().manual_seed(1))
    x, y = x.to(torch.uint8).to(device), torch.arange(50, device=device)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    old_gen = torch.Generator(device).manual_seed(4)
    new_gen = torch.Generator(device).manual_seed(4)
    loader = TensorLoader(
        {"image": x, "label": y},
        RandomSampler(50, 16),
        transforms=[RandomCrop(padding=2), RandomHFlip(), Normalize(mean, std)],
        order_generator=new_gen,
        aug_generator=new_gen,
    )
    for _ in range(2):  # two epochs: the second depends on the first's draws
        old = list(old_epoch(x, y, 16, mean, std, 2, True, old_gen))
        new = list(loader)
        assert len(old) == len(new) == 4
        for (xb, yb), batch in zip(old, new, strict=True):
            assert torch.equal(xb, batch["image"]) and torch.equal(yb, batch["label"])
    assert torch.equal(old_gen.get_state(), new_gen.get_state())
