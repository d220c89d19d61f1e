"""The image history pool of Shrivastava et al. (2017), as CycleGAN's discriminators use it."""

from typing import Any

import torch
from torch import Tensor


class ImagePool:
    """Up to `size` earlier fakes; each query fills the pool first, then returns, for each image,
    with probability 1/2 a stored fake (which the new one replaces) and otherwise the new image.

    The authors' rule, drawn on the device from the given generator (no host sync: the swap is a
    `torch.where`, the slot an `index_select` / `index_copy_`), so resume replays it exactly.
    """

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: Tensor | None = None
        self.count = 0  # filled slots (a Python int: the fill phase needs no device read)

    def query(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.size == 0:
            return images
        images = images.detach().float()
        if self.images is None:
            self.images = images.new_zeros((self.size, *images.shape[1:]))
        out = []
        for image in images:  # one decision per image, in order, as the authors' loop
            if self.count < self.size:
                self.images[self.count] = image
                self.count += 1
                out.append(image)
                continue
            u = torch.rand((), device=image.device, generator=generator)
            slot = torch.randint(0, self.size, (1,), device=image.device, generator=generator)
            old = self.images.index_select(0, slot)[0]
            swap = u > 0.5
            self.images.index_copy_(0, slot, torch.where(swap, image, old)[None])
            out.append(torch.where(swap, old, image))
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images, self.count = state.get("images"), int(state.get("count", 0))
