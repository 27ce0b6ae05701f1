import math

import pytest
import torch
from torch import nn

from imgen_cli.nn.transformer import AdaptiveLayerNorm, Attention, TransformerStack, stack_flops_per_token


def test_attention_equals_the_textbook_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=4, context_dim=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 8)
    q = attn.q(x).view(2, 5, 4, 4).transpose(1, 2)
    k, v = attn.kv(ctx).view(2, 7, 2, 4, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.out((weights @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x, ctx), expected, atol=1e-5)


def test_padded_context_tokens_are_ignored() -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=2, context_dim=8)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    changed = ctx.clone()
    changed[0, 3:] = torch.randn(3, 8) * 100  # only padding of sample 0 changes
    assert torch.allclose(attn(x, ctx, mask), attn(x, changed, mask), atol=1e-6)
    assert not torch.allclose(attn(x, ctx), attn(x, changed))


def test_self_attention_stack_is_permutation_equivariant() -> None:
    torch.manual_seed(0)
    stack = TransformerStack(32, depth=2, heads=4, context_dim=12, cond_dim=10).eval()
    x, ctx, cond = torch.randn(2, 9, 32), torch.randn(2, 4, 12), torch.randn(2, 10)
    perm = torch.randperm(9)
    assert torch.allclose(stack(x, ctx, None, cond)[:, perm], stack(x[:, perm], ctx, None, cond), atol=1e-5)


def test_adaptive_norm_starts_as_layernorm_then_modulates() -> None:
    torch.manual_seed(0)
    norm = AdaptiveLayerNorm(8, cond_dim=3)
    x, cond = torch.randn(2, 4, 8), torch.randn(2, 3)
    plain = nn.functional.layer_norm(x, (8,))
    assert torch.allclose(norm(x, cond), plain, atol=1e-6)  # zero-initialised modulation
    nn.init.normal_(norm.modulation.weight)
    scale, shift = norm.modulation(nn.functional.silu(cond)).chunk(2, dim=-1)
    assert torch.allclose(norm(x, cond), plain * (1 + scale[:, None]) + shift[:, None], atol=1e-5)
    with pytest.raises(ValueError, match="pass cond"):
        norm(x)
    stack = TransformerStack(16, depth=1, heads=2, cond_dim=4)  # its weight init keeps modulation at zero
    assert torch.count_nonzero(stack.blocks[0].norm1.modulation.weight) == 0


def test_flops_count_matches_the_parameters() -> None:
    dim, depth, seq = 64, 3, 10
    stack = TransformerStack(dim, depth, heads=4)
    matmul_params = sum(m.weight.numel() for m in stack.modules() if isinstance(m, nn.Linear))
    attention = 3 * depth * 2 * 2 * seq * dim
    assert stack_flops_per_token(dim, depth, seq) == 6 * matmul_params + attention
