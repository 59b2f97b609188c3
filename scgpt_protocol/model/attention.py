"""Attention and dropout for training on the CPU: the recipe's dropout, at the speed of the matrix units.

With dropout on, :func:`torch.nn.functional.scaled_dot_product_attention` has no fused CPU kernel: it takes
its unfused path, which draws one ``bernoulli_`` per attention probability (the mask of a ``[8, 8, 644, 644]``
batch: 26.5 million draws per layer at about 6 ns each), and keeps the probabilities, the mask and their
product for the backward pass. :func:`attention` computes the same thing in a form that stays in the cache:

- one cell and a group of heads at a time (:data:`CHUNK_ELEMENTS` scores), over that cell's own keys only
  (the padded keys of a key-padding mask are skipped, not masked: their probabilities are exactly 0 either way);
- the keep mask drawn from torch's generator as one random byte per probability plus a sparse correction
  (:func:`keep_mask`): a drop has probability ``p`` exactly, the masks follow ``torch.manual_seed``, and
  the ``1 / (1 - p)`` scale is applied to the ``[L, d_head]`` output instead of the ``[L, L]`` probabilities;
- a backward pass of its own (:class:`_DropoutAttention`) that keeps the probabilities and the mask in the
  compute dtype, and no other ``[L, L]`` tensor.

Everywhere else (CUDA, MPS, eval mode, ``p == 0``, masks other than a key-padding mask)
:func:`attention` is ``scaled_dot_product_attention`` itself, so the GPU keeps its fused kernels with dropout
and evaluation is unchanged. :class:`Dropout` is ``nn.Dropout`` with the same CPU mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention", "keep_mask", "Dropout", "CHUNK_ELEMENTS"]

#: scores ``[heads, L_q, L_k]`` computed at once by the CPU training attention (2**21: 4 MiB in bf16, 4 heads at 644)
CHUNK_ELEMENTS = 2**21


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        msg = f"dropout probability {p!r} must lie in [0, 1)."
        raise ValueError(msg)


def _bernoulli_positions(n: int, q: float) -> Tensor:
    """The positions in ``[0, n)`` where independent Bernoulli(``q``) draws succeed (int64, ascending).

    Drawn as the running sum of geometric gaps between successes, which is exactly that process and costs
    ``n * q`` draws, not ``n``.
    """
    expected = n * q
    size = int(expected + 6 * math.sqrt(expected) + 16)
    parts, last = [], -1.0
    while last < n:
        positions = torch.empty(size, dtype=torch.float64).geometric_(q).cumsum_(0).add_(last)
        parts.append(positions)
        last = positions[-1].item()
    positions = torch.cat(parts)
    return positions[positions < n].long()


def _fill_keep(out: Tensor, p: float, workspace: Tensor | None = None) -> Tensor:
    """Write a keep mask (1 kept, 0 dropped, in ``out``'s dtype) into the contiguous ``out``; returns ``out``.

    Two independent stages, so that an element is dropped with probability ``p`` exactly: a random byte per
    element (eight lanes of each full-range int64 draw of torch's CPU generator) drops it when below
    ``c = floor(256 p)``, with probability ``c / 256``; then each element is dropped with probability
    ``q = (p - c / 256) / (1 - c / 256)`` by :func:`_bernoulli_positions` (for ``p = 0.2``: about 1 in 1,000).
    ``1 - (1 - c / 256)(1 - q) = p``. ``workspace`` (int64, at least ``ceil(n / 8)`` elements) is reused if given.
    """
    n = out.numel()
    words = (n + 7) // 8
    bits = workspace[:words] if workspace is not None and workspace.numel() >= words else torch.empty(
        words, dtype=torch.int64)
    flat = out.view(-1)
    coarse = math.floor(p * 256)
    if coarse == 0:
        flat.fill_(1)
    else:
        bits.random_(-(2**63), None)  # every 64-bit value equally likely: eight independent uniform bytes
        # byte < coarse -> 0, else 1, in place (vectorised uint8 ops; a comparison into bool is 5x slower)
        keep = bits.view(torch.uint8)[:n].clamp_(coarse - 1, coarse).sub_(coarse - 1)
        flat.copy_(keep.view(torch.bool) if out.dtype == torch.bool else keep)
    rest = (p - coarse / 256) / (1 - coarse / 256)
    if rest > 0:
        flat.index_fill_(0, _bernoulli_positions(n, rest), 0)
    return out


def keep_mask(shape: tuple[int, ...] | torch.Size, p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A CPU dropout keep mask of ``shape``: 0 (dropped) with probability ``p``, else 1.

    Drawn from torch's default CPU generator, so ``torch.manual_seed`` reproduces it.

    Parameters
    ----------
    shape
        Shape of the mask.
    p
        Drop probability, in ``[0, 1)``.
    dtype
        ``torch.bool`` or a floating dtype (0 / 1 values).
    """
    _check_p(p)
    return _fill_keep(torch.empty(shape, dtype=dtype), p)


class _DropoutMask(torch.autograd.Function):
    """``x * mask * scale``, saving the mask in ``x``'s dtype (the gradient needs nothing else)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        mask = _fill_keep(torch.empty(x.shape, dtype=x.dtype), p)
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / (1.0 - p)
        out = x * mask
        return out.mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask * ctx.scale, None


class Dropout(nn.Dropout):
    """``nn.Dropout``; on the CPU in training its mask comes from :func:`keep_mask` (several times faster
    than ``bernoulli_``, the same probability to 1.2e-10, reproducible from ``torch.manual_seed``)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _DropoutMask.apply(x, self.p)


def _key_lengths(attn_mask: Tensor | None, batch: int, length: int) -> list[int] | None:
    """Per cell, how many leading keys may be attended to, when ``attn_mask`` is a boolean key-padding mask
    ``[B, 1, 1, L_k]`` whose allowed keys come first (None: another kind of mask)."""
    if attn_mask is None:
        return [length] * batch
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1:3] != (1, 1):
        return None
    allowed = attn_mask.reshape(attn_mask.shape[0], attn_mask.shape[-1]).expand(batch, length)
    counts = allowed.sum(-1)
    leading = torch.arange(length, device=allowed.device)[None, :] < counts[:, None]
    if not torch.equal(leading, allowed) or bool((counts == 0).any()):
        return None
    return counts.tolist()


class _DropoutAttention(torch.autograd.Function):
    """Softmax attention with dropout on the probabilities, chunked by cell and head group.

    Forward per chunk: ``S = (q / sqrt(d)) k^T``, ``P = softmax(S)``, ``O = (P * M) v / (1 - p)`` with the keep
    mask ``M``; ``P`` and ``P * M`` are kept. Backward, with ``G = (P * M) * (dO v^T) / (1 - p)``:
    ``dV = (P * M)^T dO / (1 - p)``, ``dS = G - P * D`` with ``D_i = sum_j G_ij`` (equal to ``dO_i . O_i``),
    ``dQ = dS k / sqrt(d)``, ``dK = dS^T q / sqrt(d)``. ``D`` is summed in fp32 from the very ``G`` it is
    subtracted from, so that each row of ``dS`` sums to zero as the softmax's gradient does (``dO . O`` from the
    bf16 output would not: the error of the rounded ``D`` would reach ``dQ`` and ``dK`` as a bias).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, lengths: list[int], p: float) -> Tensor:  # type: ignore[override]
        batch, heads, n_q, d_head = q.shape
        n_k = k.shape[2]
        group = max(1, min(heads, CHUNK_ELEMENTS // max(1, n_q * n_k)))
        q_scaled = (q * (1.0 / math.sqrt(d_head))).contiguous()
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)
        workspace = torch.empty((group * n_q * n_k + 7) // 8, dtype=torch.int64)
        mask = torch.empty(group * n_q * n_k, dtype=q.dtype)
        saved = []
        for b in range(batch):
            n = lengths[b]
            for h0 in range(0, heads, group):
                h1 = min(heads, h0 + group)
                probs = torch.softmax(torch.matmul(q_scaled[b, h0:h1], k[b, h0:h1, :n].transpose(-1, -2)), dim=-1)
                kept = probs * _fill_keep(mask[: probs.numel()], p, workspace).view(probs.shape)
                torch.matmul(kept, v[b, h0:h1, :n], out=out[b, h0:h1])
                saved += (probs, kept)
        out.mul_(1.0 / (1.0 - p))
        # intermediates too go through save_for_backward: freed by backward unless the graph is retained
        ctx.save_for_backward(q_scaled, k, v, *saved)
        ctx.lengths, ctx.group, ctx.p = lengths, group, p
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q_scaled, k, v, *saved = ctx.saved_tensors
        batch, heads, _, d_head = q_scaled.shape
        wide = torch.promote_types(q_scaled.dtype, torch.float32)
        grad_scaled = (grad_out * (1.0 / (1.0 - ctx.p))).to(q_scaled.dtype).contiguous()
        padded = min(ctx.lengths) < k.shape[2]  # keys no query attended to get a zero gradient
        dq = torch.empty_like(q_scaled)
        dk, dv = (torch.zeros_like(k), torch.zeros_like(v)) if padded else (torch.empty_like(k), torch.empty_like(v))
        chunks = iter(saved)
        for b in range(batch):
            n = ctx.lengths[b]
            for h0 in range(0, heads, ctx.group):
                h1 = min(heads, h0 + ctx.group)
                probs, kept = next(chunks), next(chunks)
                g = grad_scaled[b, h0:h1]
                _matmul_into(dv[b, h0:h1, :n], kept.transpose(-1, -2), g)
                d_scores = torch.matmul(g, v[b, h0:h1, :n].transpose(-1, -2)).mul_(kept)  # G
                row_sum = d_scores.sum(-1, keepdim=True, dtype=wide)  # D
                d_scores.addcmul_(probs, row_sum, value=-1.0)  # G - P * D, computed in fp32
                torch.matmul(d_scores, k[b, h0:h1, :n], out=dq[b, h0:h1])
                _matmul_into(dk[b, h0:h1, :n], d_scores.transpose(-1, -2), q_scaled[b, h0:h1])
        return dq.mul_(1.0 / math.sqrt(d_head)), dk, dv, None, None


def _matmul_into(target: Tensor, a: Tensor, b: Tensor) -> None:
    """``target[...] = a @ b``, written in place when ``target`` is contiguous."""
    if target.is_contiguous():
        torch.matmul(a, b, out=target)
    else:
        target.copy_(torch.matmul(a, b))


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)``, with a CPU path for training.

    Parameters
    ----------
    q, k, v
        ``[B, H, L_q, d_head]``, ``[B, H, L_k, d_head]``, ``[B, H, L_k, d_head]``.
    attn_mask
        None, or a boolean mask broadcastable to ``[B, H, L_q, L_k]``, True where attention is allowed.
    dropout_p
        Dropout on the attention probabilities (0 in evaluation).

    Returns
    -------
    Tensor
        ``[B, H, L_q, d_head]``. On the CPU with ``dropout_p > 0`` and a key-padding mask (or none) it is computed
        by :class:`_DropoutAttention`; in every other case by ``scaled_dot_product_attention``.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    _check_p(dropout_p)
    lengths = _key_lengths(attn_mask, q.shape[0], k.shape[2])
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    with torch.autocast("cpu", enabled=False):
        return _DropoutAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), lengths, dropout_p)
