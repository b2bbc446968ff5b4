"""SelfAttention: timm-compatible parameters, masks, implementations, dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cots_kernels import SelfAttention

from ..helpers import requires_triton, triton_device


def _timm_formula(module: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """timm's ViT Attention.forward, written out (no timm dependency)."""
    batch, seq, dim = x.shape
    heads = module.num_heads
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.reshape(batch, seq, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return F.linear(out.transpose(1, 2).reshape(batch, seq, dim), module.proj.weight, module.proj.bias)


def test_parameters_are_named_like_timm():
    module = SelfAttention(48, 4)
    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items()}
    assert shapes == {"qkv.weight": (144, 48), "qkv.bias": (144,), "proj.weight": (48, 48), "proj.bias": (48,)}
    assert "qkv.bias" not in SelfAttention(48, 4, qkv_bias=False).state_dict()


@pytest.mark.parametrize("impl", ["auto", "sdpa", "reference"])
def test_matches_the_timm_formula(impl):
    torch.manual_seed(0)
    module = SelfAttention(48, 4, impl=impl).double()
    x = torch.randn(3, 11, 48, dtype=torch.float64)
    torch.testing.assert_close(module(x), _timm_formula(module, x), rtol=1e-10, atol=1e-10)


def test_padding_does_not_change_the_real_tokens():
    """Each sequence's real positions equal the module run on that sequence alone."""
    torch.manual_seed(1)
    module = SelfAttention(32, 2).double().eval()
    lengths = [9, 4, 1]
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    out = module(x, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], module(x[b : b + 1, :n])[0], rtol=1e-10, atol=1e-10)


def test_attention_dropout_only_in_training():
    torch.manual_seed(2)
    module = SelfAttention(32, 2, attn_drop=0.5)
    x = torch.randn(2, 7, 32)
    module.eval()
    torch.testing.assert_close(module(x), _timm_formula(module, x))
    module.train()
    assert not torch.allclose(module(x), _timm_formula(module, x))


def test_bad_configuration():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SelfAttention(30, 4)
    with pytest.raises(ValueError, match="attn_drop"):
        SelfAttention(32, 4, attn_drop=1.0)


@requires_triton
def test_triton_module_gradients():
    """The Triton path through the module (strided q/k/v views of the fused projection)
    gives the reference's output and parameter gradients."""
    device = triton_device()
    torch.manual_seed(3)
    ours = SelfAttention(64, 2, impl="triton").to(device)
    ref = SelfAttention(64, 2, impl="reference").to(device)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 19, 64, device=device)
    mask = torch.arange(19, device=device)[None, :] < torch.tensor([19, 11], device=device)[:, None]
    results = []
    for module in (ours, ref):
        xi = x.clone().requires_grad_()
        out = module(xi, mask)
        out.square().sum().backward()
        results.append([out, xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
