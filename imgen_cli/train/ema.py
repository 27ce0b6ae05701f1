"""Exponential moving average of a model's weights, kept in fp32 as a full module for sampling."""

from __future__ import annotations

import copy

import torch

from imgen_cli.nn.family import FamilyNetwork


class EMA:
    """Shadow copy updated as ema = d * ema + (1 - d) * weights, with d warmed up from 0 when training from scratch.

    The warm-up (d_k = min(decay, (1 + k) / (10 + k))) keeps the first checkpoints from being
    dominated by the random initialisation. A fine-tune (`warmup=False`) starts from trained weights,
    which the average should keep, not forget in ten steps: there d = decay from the first update (with
    the warm-up, 300 steps would cap d at 0.97 whatever train.ema_decay says). Buffers (running
    statistics, codebook usage counts) are copied, not averaged: they are state, not weights. So are the
    parameters a family names in `ema_copied`: a VQ codebook whose dead codes restart would average into
    vectors no encoder output is near.
    """

    def __init__(self, model: FamilyNetwork, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        copied = set(model.ema_copied)
        self.copied = [name in copied for name, _ in model.named_parameters()]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: FamilyNetwork) -> None:
        d = self.current_decay()
        self.updates += 1
        for ema_p, p, copied in zip(self.module.parameters(), model.parameters(), self.copied, strict=True):
            if copied:
                ema_p.copy_(p.detach())
            else:
                ema_p.lerp_(p.detach().float(), 1 - d)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
