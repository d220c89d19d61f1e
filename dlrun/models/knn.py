"""The k-nearest-neighbour image classifier of the notes (cs231n): L1 / L2 distance on pixels."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KNN(nn.Module):
    """Memorises the training images; predicts the majority label of the k nearest ones.

    `forward` returns log vote fractions (B, K), so accuracy and cross-entropy work as for any
    classifier. The memory is not part of the state dict: it is the training set, re-read on load.
    """

    def __init__(
        self, *, num_classes: int = 10, k: int = 5, p: int = 2, chunk: int = 10000
    ) -> None:
        super().__init__()
        if p not in (1, 2):
            raise ValueError(f"unknown distance p={p}; choose 1 (L1) or 2 (L2)")
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        self.num_classes, self.k, self.p, self.chunk = num_classes, k, p, chunk
        self.register_buffer("memory", torch.empty(0), persistent=False)
        self.register_buffer("labels", torch.empty(0, dtype=torch.long), persistent=False)

    def memorize(self, x: Tensor, y: Tensor) -> None:  # (N, C, H, W), (N,)
        self.memory, self.labels = x.flatten(1).float(), y.long()

    def distances(self, q: Tensor, m: Tensor) -> Tensor:  # (B, D), (M, D) -> (B, M)
        if self.p == 2:  # |q|^2 - 2 q.m + |m|^2: one matmul instead of B*M*D differences
            return (q.pow(2).sum(1, keepdim=True) - 2 * q @ m.T + m.pow(2).sum(1)).clamp_min(0)
        return torch.cdist(q, m, p=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K)
        if self.memory.numel() == 0:
            raise RuntimeError("KNN.memorize(train_x, train_y) must be called before predicting")
        q = x.flatten(1).float()
        best_d = torch.full((len(q), 0), 0.0, device=q.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=q.device)
        for start in range(0, len(self.memory), self.chunk):  # bounded memory: (B, chunk) at a time
            d = self.distances(q, self.memory[start : start + self.chunk])
            d, i = d.topk(min(self.k, d.shape[1]), dim=1, largest=False)
            best_d, best_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + start], 1)
            best_d, order = best_d.topk(min(self.k, best_d.shape[1]), dim=1, largest=False)
            best_i = best_i.gather(1, order)
        # Votes; a tiny bonus for nearer neighbours breaks ties in favour of the closest.
        rank_bonus = 1e-3 * torch.linspace(1, 0, best_i.shape[1], device=q.device)
        votes = F.one_hot(self.labels[best_i], self.num_classes).float()
        votes = (votes * (1 + rank_bonus)[None, :, None]).sum(1)
        return torch.log(votes / votes.sum(1, keepdim=True) + 1e-6)
