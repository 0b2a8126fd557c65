"""Mixup as in the MOS / BiT recipe: one lambda ~ Beta(alpha, alpha) per optimizer step, the images
mixed with a permutation of the batch, the loss mixed with the same lambda.

Draws come from a NumPy generator of their own (seeded, state saved in checkpoints) so that every
process of a distributed run and a resumed run draw the same lambdas and permutations.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Mixup", "mix_inputs"]


class Mixup:
    def __init__(self, alpha: float, seed: int = 0):
        if alpha < 0:
            raise ValueError(f"Mixup: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def enabled(self) -> bool:
        return self.alpha > 0

    def draw(self, batch: int):
        """(lambda, permutation of range(batch)) for one optimizer step; (1.0, None) when disabled."""
        if not self.enabled:
            return 1.0, None
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(self.rng.permutation(batch))
        return lam, perm

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        self.rng.bit_generator.state = state["rng"]


def mix_inputs(x: torch.Tensor, lam: float, perm) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm] (x unchanged when perm is None)."""
    if perm is None:
        return x
    if perm.numel() != x.shape[0]:
        raise ValueError(f"mix_inputs: permutation of {perm.numel()} for a batch of {x.shape[0]}")
    return x.mul(lam).add_(x[perm.to(x.device)], alpha=1.0 - lam)
