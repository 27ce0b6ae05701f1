"""The base every family's network derives from: what the training engine may ask of any of them.

These are declarations with defaults, so the engine reads them directly and never probes a network with
`hasattr`: a family overrides what applies to it.
"""

from __future__ import annotations

from torch import nn


class FamilyNetwork(nn.Module):
    # the units the training engine shards (FSDP2) and recomputes (activation checkpointing); none: neither
    block_types: tuple[type[nn.Module], ...] = ()
    # parameters the EMA copies instead of averaging (a VQ codebook whose dead codes restart)
    ema_copied: tuple[str, ...] = ()
    # learned position tables [positions, width] that `train --init` may stretch to another grid (linear
    # interpolation along the positions), e.g. the row and column tables of a token grid
    position_tables: tuple[str, ...] = ()

    @property
    def tokens_per_sample(self) -> int | None:
        """Tokens in one training sample, logged as tokens/s; None for a network that does not model tokens."""
        return None
