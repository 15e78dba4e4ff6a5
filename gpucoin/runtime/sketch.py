"""A count-sketch of a model's gradient: a few hundred numbers that commit to it.

Each gradient element i of parameter p lands in bucket h_p(i) with sign s_p(i), both drawn
from a generator seeded by the job seed and p's index, so every rank and every verifier
hashes identically. The sketch is linear: the sketch of a sum of gradients (micro-steps,
tied weights) is the sum of their sketches (Charikar, Chen, Farach-Colton 2002).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


class CountSketch:
    """Count-sketch of the gradients of ``params`` into ``buckets`` float64 numbers.

    Args:
        params: the model's parameters in a fixed order (``model.parameters()``).
        buckets: sketch width B.
        seed: the job seed.

    A rank sketches its local gradient before it feeds it into the reduction, replay the one it
    recomputes (``runtime.step.rank_step``, for both).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], buckets: int, seed: int):
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.buckets = buckets
        self.params = [p for p in params if p.requires_grad]
        self._index: list[torch.Tensor] = []
        self._sign: list[torch.Tensor] = []
        for i, p in enumerate(self.params):
            g = torch.Generator().manual_seed((seed * 1_000_003 + i) % 2**63)
            self._index.append(torch.randint(0, buckets, (p.numel(),), generator=g))
            self._sign.append(torch.randint(0, 2, (p.numel(),), generator=g).double() * 2 - 1)
        self._acc = torch.zeros(buckets, dtype=torch.float64)
        self._handles: list = []

    def sketch(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Sketch of one gradient of parameter ``i``: (B,) float64."""
        out = torch.zeros(self.buckets, dtype=torch.float64)
        out.index_add_(0, self._index[i], grad.detach().reshape(-1).to(torch.float64).cpu() * self._sign[i])
        return out

    def sketch_grads(self, grads: Iterable[torch.Tensor | None]) -> np.ndarray:
        """Sketch of one gradient per parameter (``params``' order and shapes; None: no gradient):
        (B,) float64, summed over the parameters."""
        acc = torch.zeros(self.buckets, dtype=torch.float64)
        for i, g in enumerate(grads):
            if g is not None:
                acc += self.sketch(i, g)
        return acc.numpy()
