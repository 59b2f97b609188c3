"""The CPU training attention and dropout (scgpt_protocol.model.attention): the recipe's dropout, computed faster.

What must hold: the drop rate is p, masks follow torch.manual_seed, the output and its gradients are those of
softmax attention with the same mask applied to the probabilities (float64, against a direct computation and
torch.autograd.gradcheck), evaluation and every case outside the CPU training path are scaled_dot_product_attention
itself, and the optimiser's fused kernel makes the same update as the for-loop one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scgpt_protocol.adapt.optim import make_optimizer
from scgpt_protocol.model import attention as att
from scgpt_protocol.model.scgpt import ScGPT, ScGPTConfig


def _qkv(batch=3, heads=4, length=37, d_head=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d_head, dtype=dtype, generator=gen, requires_grad=True)
            for _ in range(3)]


def _padding(batch=3, length=37):
    pad = torch.zeros(batch, length, dtype=torch.bool)
    pad[1, 30:] = True
    pad[2, 5:] = True
    return pad


@pytest.mark.parametrize("p", [0.2, 0.1, 0.5, 0.001])  # the recipe's; a byte and a correction; a byte; a correction
def test_drop_rate_is_p(p):
    # 2**24 draws: the drop share has a standard deviation sqrt(p (1 - p) / n) <= 1.2e-4; 5 of them is the
    # tolerance (a false failure once in ~3.5 million runs). The byte stage alone would be off by
    # p - floor(256 p) / 256 (7.8e-4 = 8 standard deviations at p = 0.2): the test sees a missing correction.
    torch.manual_seed(0)
    n = 2**24
    mask = att.keep_mask((n,), p, dtype=torch.bool)
    assert abs(1.0 - mask.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    for dtype in (torch.float32, torch.bfloat16):  # the float masks are the same draws, as 0 / 1
        torch.manual_seed(0)
        assert torch.equal(att.keep_mask((n,), p, dtype=dtype), mask.to(dtype))


def test_sparse_correction_is_a_bernoulli_process():
    # the positions of the second stage: each position in with probability q, independently (rate and
    # gaps: the share of gaps of 1 is q for a Bernoulli process)
    torch.manual_seed(2)
    n, q = 2**24, 0.01
    positions = att._bernoulli_positions(n, q)
    assert positions.min() >= 0 and positions.max() < n and bool((positions.diff() > 0).all())
    assert abs(len(positions) / n - q) < 5 * math.sqrt(q * (1 - q) / n)
    ones = (positions.diff() == 1).double().mean().item()
    assert abs(ones - q) < 5 * math.sqrt(q * (1 - q) / len(positions))


def test_masks_are_independent_across_positions():
    # neighbours come from the eight bytes of one 64-bit draw: their drops must not be correlated
    torch.manual_seed(1)
    p, n = 0.2, 2**24
    drop = ~att.keep_mask((n,), p, dtype=torch.bool)
    for lag in (1, 7, 8):
        both = (drop[:-lag] & drop[lag:]).double().mean().item()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / (n - lag))


def test_masks_are_reproducible_from_the_seed():
    torch.manual_seed(7)
    first = att.keep_mask((64, 65), 0.2)
    torch.manual_seed(7)
    assert torch.equal(att.keep_mask((64, 65), 0.2), first)
    torch.manual_seed(8)
    assert not torch.equal(att.keep_mask((64, 65), 0.2), first)
    q, k, v = _qkv()
    mask = (~_padding())[:, None, None, :]
    torch.manual_seed(3)
    out = att.attention(q, k, v, mask, 0.2)
    torch.manual_seed(3)
    assert torch.equal(att.attention(q, k, v, mask, 0.2), out)


def _recorded_masks(monkeypatch):
    masks = []
    fill = att._fill_keep

    def recording(out, p, workspace=None):
        masks.append(fill(out, p, workspace).clone())
        return masks[-1]

    monkeypatch.setattr(att, "_fill_keep", recording)
    return masks


@pytest.mark.parametrize("chunk", [att.CHUNK_ELEMENTS, 37 * 37])  # all heads of a cell at once; one head
def test_output_and_gradients_equal_attention_with_the_same_mask(monkeypatch, chunk):
    monkeypatch.setattr(att, "CHUNK_ELEMENTS", chunk)
    masks = _recorded_masks(monkeypatch)
    q, k, v = _qkv()
    pad = _padding()
    torch.manual_seed(0)
    out = att.attention(q, k, v, (~pad)[:, None, None, :], 0.2)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    # the masks drawn, chunk by chunk (a cell's own keys only), as one [B, H, L, L] keep mask
    batch, heads, length, d_head = q.shape
    group = max(1, min(heads, chunk // (length * length)))
    keep, drawn = torch.ones(batch, heads, length, length, dtype=q.dtype), iter(masks)
    for b in range(batch):
        n = int((~pad[b]).sum())
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            keep[b, h0:h1, :, :n] = next(drawn)[: (h1 - h0) * length * n].view(h1 - h0, length, n)
    assert next(drawn, None) is None
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d_head)).masked_fill(pad[:, None, None, :], float("-inf"))
    ref = (torch.softmax(scores, -1) * keep / 0.8) @ v
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert 0.1 < 1 - keep[:, :, :, :5].mean().item() < 0.3  # the masks did drop (the unpadded keys)


def test_gradcheck():
    q, k, v = _qkv(batch=2, heads=2, length=5, d_head=3)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True

    def fixed_mask(q, k, v):  # the same masks at every evaluation
        torch.manual_seed(0)
        return att.attention(q, k, v, (~pad)[:, None, None, :], 0.3)

    assert torch.autograd.gradcheck(fixed_mask, (q, k, v))


def test_bf16_autocast_stays_close_to_float64():
    q, k, v = _qkv(batch=2, heads=8, length=64, d_head=16, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = att.attention(q, k, v, None, 0.2)
    assert low.dtype == torch.bfloat16
    torch.manual_seed(0)  # the same masks (drawn in the same chunks)
    high = att.attention(*(t.double() for t in (q, k, v)), None, 0.2)
    assert (low.double() - high).abs().max().item() < 0.05 * high.abs().max().item()


def test_bf16_gradients_are_as_accurate_as_autograd_through_the_same_bf16_operations(monkeypatch):
    """In bf16 the key gradients must not gain a bias: each row of dS sums to zero (softmax), so the sum of dK
    over a cell's keys is zero in exact arithmetic. Ours is held to what autograd through the same bf16 matmuls,
    softmax and mask gives (a D from the rounded output, dO . O, doubled that sum and the error of dQ and dK)."""
    masks = _recorded_masks(monkeypatch)
    q64, k64, v64 = _qkv(batch=4, heads=4, length=128, d_head=16, seed=1)
    grad = torch.randn(q64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def bf16_leaves():
        return [t.detach().bfloat16().requires_grad_() for t in (q64, k64, v64)]

    torch.manual_seed(0)
    q, k, v = bf16_leaves()
    att.attention(q, k, v, None, 0.2).backward(grad.bfloat16())
    ours = [t.grad.double() for t in (q, k, v)]
    keep = torch.stack([m[: 4 * 128 * 128].view(4, 128, 128) for m in masks])  # one chunk per cell
    assert keep.shape == (4, 4, 128, 128)

    def direct(q, k, v):  # the same attention and masks as plain differentiable operations
        probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
        return (probs * keep.to(q.dtype)) @ v / 0.8

    q, k, v = bf16_leaves()
    direct(q, k, v).backward(grad.bfloat16())
    plain = [t.grad.double() for t in (q, k, v)]
    exact = torch.autograd.grad(direct(q64, k64, v64), (q64, k64, v64), grad)

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    def key_sum(dk):  # zero in exact arithmetic
        return (dk.sum(2).norm() / dk.norm()).item()

    for mine, theirs, ref in zip(ours, plain, exact):
        assert error(mine, ref) < 1.1 * error(theirs, ref)
    assert key_sum(exact[1]) < 1e-12
    assert key_sum(ours[1]) < 1.3 * key_sum(plain[1])


def test_outside_cpu_training_it_is_scaled_dot_product_attention():
    q, k, v = _qkv(dtype=torch.float32)
    mask = (~_padding())[:, None, None, :]
    assert torch.equal(att.attention(q, k, v, mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # a mask that is not a key-padding mask (per query) goes to SDPA, with its own dropout
    full = torch.rand(3, 1, 37, 37) > 0.3
    full[..., 0] = True
    torch.manual_seed(0)
    out = att.attention(q, k, v, full, 0.2)
    torch.manual_seed(0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=full, dropout_p=0.2))


def test_dropout_module_rate_scale_gradient_and_eval():
    layer = att.Dropout(0.2)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    kept = y != 0
    assert abs(1 - kept.double().mean().item() - 0.2) < 5 * math.sqrt(0.16 / x.numel())
    assert torch.allclose(y[kept], torch.tensor(1.25))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * 1.25)
    layer.eval()
    assert layer(x) is x


def test_bad_dropout_probability_is_refused():
    with pytest.raises(ValueError, match="dropout probability"):
        att.keep_mask((4,), 1.0)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dropout probability"):
        att.attention(q, k, v, None, -0.1)


def test_model_training_uses_the_same_masks_for_the_same_seed():
    cfg = ScGPTConfig(vocab_size=40, pad_token_id=0, d_model=16, nheads=2, d_hid=32, nlayers=2, n_classes=3)
    torch.manual_seed(0)
    model = ScGPT(cfg).train()
    genes = torch.randint(1, 40, (4, 12))
    values = torch.rand(4, 12)
    pad = torch.zeros(4, 12, dtype=torch.bool)
    pad[2, 7:] = True
    torch.manual_seed(5)
    first = model.classify(genes, values, pad)
    torch.manual_seed(5)
    assert torch.equal(model.classify(genes, values, pad), first)
    torch.manual_seed(6)
    assert not torch.equal(model.classify(genes, values, pad), first)


@pytest.mark.parametrize("eps", [1e-4, 1e-8])
def test_fused_optimizer_makes_the_for_loop_update(eps):
    torch.manual_seed(0)
    start = [torch.randn(300, 16), torch.randn(16)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt_fused = make_optimizer(fused, lr=1e-3, eps=eps, device=torch.device("cpu"))
    opt_plain = torch.optim.AdamW(plain, lr=1e-3, eps=eps, weight_decay=0.0)
    for step in range(4):
        grads = [torch.randn_like(t) for t in start]
        grads[0][:100] = 0 if step else grads[0][:100]  # rows without gradient still move (Adam's momentum)
        for params, opt in ((fused, opt_fused), (plain, opt_plain)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
