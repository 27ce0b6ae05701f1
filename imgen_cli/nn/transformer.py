"""Transformer building blocks shared by the token families (Muse, VQ-Diffusion, latent DiffiT).

One pre-norm block covers the variants the papers use:

    x += SelfAttn(norm1(x, cond))
    x += CrossAttn(norm2(x, cond), context)      when the block has a context (text states)
    x += MLP(norm3(x))

`norm` is a LayerNorm, or with a conditioning vector (timestep embedding, pooled text) an adaptive
one: LN without affine, then (1 + scale) * x + shift with scale and shift from a zero-initialised
linear map, so every block starts as the plain pre-norm block. Attention always goes through
`F.scaled_dot_product_attention`: unmasked self-attention stays eligible for flash kernels; a key
padding mask (text) sends cross-attention to the memory-efficient kernel.

Sampling runs every step against the same encoded prompts, so under `cached_context` each cross-attention
layer projects a context tensor to keys and values once per sampling run instead of once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given, else cross-attention to it."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)
        # context tensor id -> (the tensor, its keys and values) while `cached_context` is on; holding the
        # tensor keeps its id from being reused by another one
        self.context_cache: dict[int, tuple[Tensor, Tensor]] | None = None

    def keys_values(self, source: Tensor, norm: nn.Module | None = None) -> Tensor:
        """[2, B, heads, S, head_dim] for a source [B, S, C], normalised by `norm` first if given."""
        b, s, _ = source.shape
        return self.kv(source if norm is None else norm(source)).view(b, s, 2, self.heads, -1).permute(2, 0, 3, 1, 4)

    def context_keys_values(self, context: Tensor, norm: nn.Module | None) -> Tensor:
        cache = self.context_cache
        if cache is None:
            return self.keys_values(context, norm)
        if id(context) not in cache:
            cache[id(context)] = (context, self.keys_values(context, norm))
        return cache[id(context)][1]

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None,
                context_norm: nn.Module | None = None) -> Tensor:
        """x [B, L, D]; context [B, S, C]; key_mask [B, S] bool, True = attend (a padding mask); context_norm:
        a module applied to the context before its projection (part of what the cache saves)."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.keys_values(x) if context is None else self.context_keys_values(context, context_norm)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaptiveLayerNorm(nn.Module):
    """LayerNorm; with `cond_dim`, modulated by a conditioning vector and starting as a plain LN."""

    def __init__(self, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=cond_dim is None)
        self.modulation = None
        if cond_dim is not None:
            self.modulation = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        x = self.norm(x)
        if self.modulation is None:
            return x
        if cond is None:
            raise ValueError("this block is conditioned: pass cond")
        scale, shift = self.modulation(F.silu(cond)).unsqueeze(1).chunk(2, dim=-1)
        return x * (1 + scale) + shift


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 cond_dim: int | None = None):
        super().__init__()
        self.norm1 = AdaptiveLayerNorm(dim, cond_dim)
        self.attn = Attention(dim, heads)
        self.cross = None
        if context_dim is not None:
            self.norm2 = AdaptiveLayerNorm(dim, cond_dim)
            self.cross = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                cond: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x, cond))
        if self.cross is not None:
            x = x + self.cross(self.norm2(x, cond), context, context_mask)
        return x + self.mlp(self.norm3(x))


class TransformerStack(nn.Module):
    """`depth` blocks and a final LayerNorm; `block_types` tells the engine what to shard and recompute."""

    block_types = (TransformerBlock,)

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None,
                 cond_dim: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, context_dim, cond_dim)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)
        for block in self.blocks:  # re-zero the adaptive norms the generic init just overwrote
            for norm in block.modules():
                if isinstance(norm, AdaptiveLayerNorm) and norm.modulation is not None:
                    nn.init.zeros_(norm.modulation.weight)
                    nn.init.zeros_(norm.modulation.bias)

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                cond: Tensor | None = None) -> Tensor:
        for block in self.blocks:
            x = block(x, context, context_mask, cond)
        return self.norm(x)


@contextlib.contextmanager
def cached_context(model: nn.Module) -> Iterator[None]:
    """Within: every cross-attention layer of `model` computes the keys and values of a context tensor once and
    reuses them each time the same tensor object comes back (a sampling loop passes its encoded prompts to
    every step). Only for inference: a cached projection carries no gradient to later steps' backward."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.context_cache = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.context_cache = None


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def stack_flops_per_token(dim: int, depth: int, seq_len: int, mlp_ratio: float = 4.0,
                          context_len: int = 0, context_dim: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward) per token, for MFU."""
    hidden = int(dim * mlp_ratio)
    matmul_params = 4 * dim * dim + 2 * dim * hidden  # q, kv (2), out; fc1, fc2
    attention = 2 * 2 * seq_len * dim  # QK^T and AV
    if context_len:
        matmul_params += 2 * dim * dim + 2 * (context_dim or dim) * dim * context_len / seq_len
        attention += 2 * 2 * context_len * dim
    return 3 * depth * (2 * matmul_params + attention)
