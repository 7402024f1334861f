"""ReLU, the paper's LRN and its overlapping 3x3 stride-2 max-pool (after conv1 and conv2)
as one Triton kernel per direction.

Eagerly these three layers pass over the convolution's output several times each way and
keep the ReLU's and the LRN's outputs for the backward, and on a GPU they, not the
convolutions, set the step's time at AlexNet's size (docs/BENCHMARKS.md). Here:

* the forward reads the convolution's output once and writes the pooled map, plus, per
  pooled value, which of its 9 window positions won (one byte, where ``MaxPool2d`` keeps
  eight);
* the backward reads the convolution's output again and recomputes the LRN from it,
  routing each pooled gradient to the position that won; nothing else is kept.

All arithmetic is float32 whatever the input's precision, as in
:func:`alexnet_dist.model._lrn`, whose window this follows: channel c sums the squares of
channels c - size//2 .. c - size//2 + size - 1 (CONTRACT.md's formula for odd sizes), and
alpha is not divided by size. Ties and NaNs in a window go as ``MaxPool2d`` sends them:
the first maximum in row order, any NaN.

The model calls :func:`relu_lrn_pool` on CUDA tensors (``alexnet_dist.model.ReLULRNPool``).
With ``TRITON_INTERPRET=1`` set before this module is imported, Triton's interpreter runs
the same kernels on CPU tensors: that is how ``tests/test_fused.py`` checks them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["relu_lrn_pool"]

POOL, STRIDE = 3, 2  # MaxPool2d(3, 2): the paper's overlapping pool
_POOL, _STRIDE = tl.constexpr(POOL), tl.constexpr(STRIDE)  # the same for the kernels, which read only constexpr globals
# A program's tile of positions x channels: 2 values per thread at 4 warps. With 8, ptxas
# (sm_90, Triton 3.8) needed 255 registers and spilled in both kernels; with 2, 71 forward
# and 142 backward, no spills.
ELEMENTS_PER_PROGRAM = 256


@triton.jit
def _relu_lrn(y_ptr, at, c, C, stride_c, rows_ok, alpha, beta, k,
              SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """At the positions whose channel-0 offsets are ``at`` (a column) and the channels ``c``
    (a row): a = ReLU(y), the LRN's denominator d = k + alpha * (window's sum of a^2), and
    d^-beta, all float32. Channels outside 0..C-1 count as zeros."""
    window = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    a = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for s in tl.static_range(SIZE):
        cs = c + (s - SIZE // 2)
        ys = tl.load(y_ptr + at + cs * stride_c, mask=rows_ok & (cs >= 0) & (cs < C), other=0.0).to(tl.float32)
        as_ = tl.where(ys < 0, 0.0, ys)  # ReLU that keeps NaN, as torch's does
        window += as_ * as_
        if s == SIZE // 2:
            a = as_
    d = k + alpha * window
    return a, d, tl.exp2(-beta * tl.log2(d))


@triton.jit
def _forward_kernel(y_ptr, out_ptr, won_ptr, N, C, H, W, HO, WO,
                    y_sn, y_sc, y_sh, y_sw, o_sn, o_sc, o_sh, o_sw, alpha, beta, k,
                    SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]  # pooled positions (n, ho, wo), flat
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    rows_ok = p < N * HO * WO
    n = (p // (HO * WO)).to(tl.int64)  # int64 offsets: a large batch passes 2^31 elements
    ho = p // WO % HO
    wo = p % WO
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    won = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for r in tl.static_range(_POOL):  # the window row by row, MaxPool2d's order
        for q in tl.static_range(_POOL):
            at = n * y_sn + (_STRIDE * ho + r) * y_sh + (_STRIDE * wo + q) * y_sw
            a, _, scale = _relu_lrn(y_ptr, at, c, C, y_sc, rows_ok, alpha, beta, k, SIZE, BLOCK_P, BLOCK_C)
            b = a * scale
            take = (b > best) | (b != b)  # the first maximum, and any NaN
            best = tl.where(take, b, best)
            won = tl.where(take, r * _POOL + q, won)
    to = n * o_sn + c * o_sc + ho * o_sh + wo * o_sw
    inside = rows_ok & (c < C)
    tl.store(out_ptr + to, best.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(won_ptr + to, won.to(tl.int8), mask=inside)


@triton.jit
def _pooled_grad(won_ptr, g_ptr, n, c, h, w, HO, WO, ok, w_sn, w_sc, w_sh, w_sw, g_sn, g_sc, g_sh, g_sw,
                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient max-pool hands to input position (h, w) of channels c: the sum over the
    windows (up to 2x2) that hold the position and took it."""
    total = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for i in tl.static_range(2):
        ho = h // _STRIDE - i  # row h is row h - 2*ho of window ho: 0 or 1 (i = 0), or 2 (i = 1, h even)
        r = h - _STRIDE * ho
        for j in tl.static_range(2):
            wo = w // _STRIDE - j
            q = w - _STRIDE * wo
            holds = ok & (ho >= 0) & (ho < HO) & (r < _POOL) & (wo >= 0) & (wo < WO) & (q < _POOL)
            won = tl.load(won_ptr + n * w_sn + c * w_sc + ho * w_sh + wo * w_sw, mask=holds, other=-1)
            took = won == r * _POOL + q
            total += tl.load(g_ptr + n * g_sn + c * g_sc + ho * g_sh + wo * g_sw, mask=took, other=0.0).to(tl.float32)
    return total


@triton.jit
def _backward_kernel(y_ptr, won_ptr, g_ptr, gy_ptr, N, C, H, W, HO, WO,
                     y_sn, y_sc, y_sh, y_sw, w_sn, w_sc, w_sh, w_sw, g_sn, g_sc, g_sh, g_sw,
                     d_sn, d_sc, d_sh, d_sw, alpha, beta, k,
                     SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)[:, None]  # input positions (n, h, w), flat
    j = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    rows_ok = p < N * H * W
    n = (p // (H * W)).to(tl.int64)
    h = p // W % H
    w = p % W
    at = n * y_sn + h * y_sh + w * y_sw
    # With b_c = a_c d_c^-beta and gb the gradient max-pool hands to b:
    # grad a_j = gb_j d_j^-beta - 2 alpha beta a_j * sum over the channels c whose window holds j
    # of gb_c a_c d_c^(-beta-1).
    cross = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    direct = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    a_j = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for s in tl.static_range(SIZE):
        c = j + (SIZE // 2 - s)  # channel c's window, c - SIZE//2 .. c - SIZE//2 + SIZE - 1, holds j
        real = (c >= 0) & (c < C)
        a, d, scale = _relu_lrn(y_ptr, at, c, C, y_sc, rows_ok, alpha, beta, k, SIZE, BLOCK_P, BLOCK_C)
        gb = _pooled_grad(won_ptr, g_ptr, n, c, h, w, HO, WO, rows_ok & real, w_sn, w_sc, w_sh, w_sw,
                          g_sn, g_sc, g_sh, g_sw, BLOCK_P, BLOCK_C)
        cross += tl.where(real, gb * a * scale / d, 0.0)
        if s == SIZE // 2:
            direct = gb * scale
            a_j = a
    grad = tl.where(a_j > 0, direct - 2.0 * alpha * beta * a_j * cross, 0.0)  # ReLU's backward, as torch's
    to = n * d_sn + j * d_sc + h * d_sh + w * d_sw
    tl.store(gy_ptr + to, grad.to(gy_ptr.dtype.element_ty), mask=rows_ok & (j < C))


def _pooled_size(x: Tensor) -> tuple[int, int]:
    if x.dim() != 4 or min(x.shape[2:]) < POOL:
        raise ValueError(f"relu_lrn_pool needs N x C x H x W maps of at least {POOL}x{POOL}, got {tuple(x.shape)}")
    return tuple((s - POOL) // STRIDE + 1 for s in x.shape[2:])


def _layout(x: Tensor) -> torch.memory_format:
    """x's own memory format, for the maps made from it (NHWC on GPUs, what the next convolution reads)."""
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def _grid(positions: int, channels: int) -> tuple[tuple[int, int], int, int]:
    block_c = min(64, channels & -channels)  # the largest power of two dividing C: no idle lanes (48 -> 16)
    block_p = ELEMENTS_PER_PROGRAM // block_c
    return (triton.cdiv(positions, block_p), triton.cdiv(channels, block_c)), block_p, block_c


class _ReLULRNPool(torch.autograd.Function):
    """Forward: max_pool2d(lrn(relu(x)), 3, 2) in one kernel; keeps x and each window's
    winning position. Backward: one kernel from x, the winners and the pooled gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
        (n, c, h, w), (ho, wo) = x.shape, _pooled_size(x)
        out = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=_layout(x))
        won = torch.empty((n, c, ho, wo), dtype=torch.int8, device=x.device, memory_format=_layout(x))
        grid, block_p, block_c = _grid(n * ho * wo, c)
        _forward_kernel[grid](x, out, won, n, c, h, w, ho, wo, *x.stride(), *out.stride(), alpha, beta, k,
                              SIZE=size, BLOCK_P=block_p, BLOCK_C=block_c)
        ctx.save_for_backward(x, won)
        ctx.lrn = (size, alpha, beta, k)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, won = ctx.saved_tensors
        size, alpha, beta, k = ctx.lrn
        (n, c, h, w), (ho, wo) = x.shape, won.shape[2:]
        grad_x = torch.empty_like(x)
        grid, block_p, block_c = _grid(n * h * w, c)
        _backward_kernel[grid](x, won, grad, grad_x, n, c, h, w, ho, wo, *x.stride(), *won.stride(), *grad.stride(),
                               *grad_x.stride(), alpha, beta, k, SIZE=size, BLOCK_P=block_p, BLOCK_C=block_c)
        return grad_x, None, None, None, None


def relu_lrn_pool(x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> Tensor:
    """``max_pool2d(lrn(relu(x)), 3, 2)`` for N x C x H x W maps, in one Triton kernel each way
    (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``); the LRN is the paper's, as
    ``alexnet_dist.model.LocalResponseNorm(size, alpha, beta, k)`` computes it."""
    return _ReLULRNPool.apply(x, size, alpha, beta, k)

