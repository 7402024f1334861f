"""``bench model``'s per-layer table: where one tower's step spends its time.

Every step of tower 0 (a convolution, a fully-connected layer, the fused ReLU + LRN +
max-pool, a ReLU, a pool, dropout) is timed on its own, forward and backward, on an input of
the shape it gets in the network at the run's batch, precision and layout. The ReLU + LRN +
max-pool steps after conv1 and conv2 are memory-bound: for them the table also gives the
bytes they must move and the GB/s that makes, against this device's copy bandwidth measured
in the same run, and their relative error against float64. On a GPU the step is the fused
Triton kernel (:mod:`alexnet_dist.fused`), with the three eager layers timed beside it; on
CPUs it is the eager layers.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from alexnet_dist.bench.timing import bench_device
from alexnet_dist.config import Config
from alexnet_dist.model import ReLULRNPool, Tower, memory_format_for
from alexnet_dist.topology import NUM_TOWERS

__all__ = ["copy_bandwidth_gbps", "layer_table", "norm_pool_bytes", "norm_pool_errors"]


def copy_bandwidth_gbps(device: torch.device, repeats: int = 10) -> float:
    """GB/s of a large copy on ``device``, bytes read plus bytes written: the ceiling of a
    memory-bound kernel (1 GiB on a GPU, many times its L2; 64 MiB on a CPU)."""
    n = (2**30 if device.type == "cuda" else 2**26) // 4
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _median_seconds(lambda _: dst.copy_(src), lambda: None, repeats, 3, device) / 1e9


def _pooled_shape(shape: torch.Size) -> tuple[int, ...]:
    """N x C x H x W after the 3x3 stride-2 max-pool."""
    return (*shape[:2], *((s - 3) // 2 + 1 for s in shape[2:]))


def norm_pool_bytes(x: Tensor) -> tuple[int, int]:
    """Bytes the fused ReLU + LRN + max-pool must move for input ``x``, each tensor once:
    forward, x in and the pooled map with its one-byte window winners out; backward, x, the
    pooled gradient and the winners in, x's gradient out."""
    maps, pooled = x.numel() * x.element_size(), math.prod(_pooled_shape(x.shape)) * (x.element_size() + 1)
    return maps + pooled, 2 * maps + pooled


def _median_seconds(run: Callable[[Any], Any], prepare: Callable[[], Any], repeats: int, warmup: int,
                    device: torch.device) -> float:
    """Median seconds of ``run(prepare())``, ``prepare`` left out of the time (on a GPU, CUDA
    events around each run, with no host sync until the end)."""
    for _ in range(warmup):
        run(prepare())
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            arg = prepare()
            t0 = time.perf_counter()
            run(arg)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    marks = []
    for _ in range(repeats):
        arg = prepare()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(arg)
        end.record()
        marks.append((start, end))
    torch.cuda.synchronize(device)
    return statistics.median(a.elapsed_time(b) / 1e3 for a, b in marks)


def _time_step(run: Callable[[Tensor], Tensor], weights: list[Tensor], x: Tensor, steps: int,
               warmup: int) -> tuple[float, float]:
    """(forward, backward) seconds of ``run`` on ``x`` as training runs it: the forward with
    autograd recording, the backward computing the gradients of x (unless it is the input
    images) and of ``weights``. Each run gets a fresh copy of x, made outside the time: the
    eager ReLUs work in place."""
    wanted = ([x] if x.requires_grad else []) + weights
    grad = torch.randn_like(run(x.clone()))
    forward = _median_seconds(run, x.clone, steps, warmup, x.device)
    backward = _median_seconds(lambda y: torch.autograd.grad(y, wanted, grad), lambda: run(x.clone()), steps,
                               warmup, x.device)
    return forward, backward


def _row(layer: str, step: Callable[[Tensor], Tensor], kernel: str, x: Tensor, steps: int, warmup: int,
         bandwidth: float) -> dict[str, Any]:
    """The row of ``step``; a :class:`ReLULRNPool` runs as ``kernel`` says (``fused``: its own
    dispatch, ``eager``: its three layers)."""
    norm_pool = isinstance(step, ReLULRNPool)
    run = step.unfused if norm_pool and kernel == "eager" else step
    weights = list(step.parameters()) if isinstance(step, nn.Module) else []
    forward, backward = _time_step(run, weights, x, steps, warmup)
    row = dict(layer=layer, step=type(step).__name__, kernel=kernel, forward_ms=1e3 * forward,
               backward_ms=1e3 * backward)
    if norm_pool:
        moved = norm_pool_bytes(x)
        rates = moved[0] / forward / 1e9, moved[1] / backward / 1e9
        row.update(bytes_forward=moved[0], bytes_backward=moved[1], gbps_forward=rates[0], gbps_backward=rates[1],
                   of_copy_bandwidth_forward=rates[0] / bandwidth, of_copy_bandwidth_backward=rates[1] / bandwidth)
    return row


def _steps_with_inputs(cfg: Config, num_classes: int):
    """(layer name, step, its input) for every step of tower 0 at the run's batch, precision
    and layout, each input made by the steps before it (an exchange's output is every
    tower's activations: here tower 0's, repeated)."""
    device, dtype = bench_device(), cfg.train.torch_dtype
    tower = Tower(0, num_classes, cfg.model.width_mult, cfg.model.dropout)
    tower.init_weights(cfg.model.init)
    tower.to(device, dtype)
    size = cfg.data.image_size
    x = torch.randn(cfg.train.micro_batch_size, 3, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format_for(device))
    for run, exchange in tower.segments():
        for layer in run:
            for step in layer.steps:
                yield layer.name.split(".", 1)[1], step, x
                with torch.no_grad():
                    x = step(x.clone()).detach().requires_grad_()
        if exchange:
            x = torch.cat([x] * NUM_TOWERS, 1).detach().requires_grad_()


def layer_table(cfg: Config, num_classes: int, steps: int, warmup: int, bandwidth: float) -> list[dict[str, Any]]:
    """One row per step of tower 0 (the network runs two such towers): its forward and
    backward milliseconds, and for the ReLU + LRN + max-pool steps the bytes, GB/s and share
    of ``bandwidth`` (GB/s). Where the fused kernel runs, its eager layers get a row too."""
    rows = []
    for layer, step, x in _steps_with_inputs(cfg, num_classes):
        fused = isinstance(step, ReLULRNPool) and ReLULRNPool.kernels(x) is not None
        for kernel in ("fused", "eager") if fused else ("eager",):
            rows.append(_row(layer, step, kernel, x, steps, warmup, bandwidth))
    return rows


def norm_pool_errors(cfg: Config, num_classes: int, batch: int = 4) -> dict[str, float]:
    """Relative error against float64 on the CPU of the ReLU + LRN + max-pool steps' outputs
    and input gradients on this device in the run's precision and layout (the fused kernel on
    a GPU), at their shapes in the network, on conv-like inputs: signed values up to ~600,
    where the LRN's denominator reaches several times k."""
    errors = {}
    g = torch.Generator().manual_seed(2)
    for layer, step, x in _steps_with_inputs(cfg, num_classes):
        if not isinstance(step, ReLULRNPool):
            continue
        shape = (min(batch, x.shape[0]), *x.shape[1:])
        values = (torch.randn(shape, generator=g, dtype=torch.float64) * 150).to(x.dtype).double()
        grad = torch.randn(_pooled_shape(shape), generator=g, dtype=torch.float64).to(x.dtype).double()
        results = []
        for device, dtype, run in ((x.device, x.dtype, step), (torch.device("cpu"), torch.float64, step.unfused)):
            inp = values.to(device, dtype).contiguous(memory_format=memory_format_for(device)).requires_grad_()
            out = run(inp.clone())
            out.backward(grad.to(device, dtype))
            results.append((out.detach().double().cpu(), inp.grad.double().cpu()))
        (got, got_grad), (want, want_grad) = results
        errors[f"{layer}.relu_lrn_pool_rel_error"] = float((got - want).norm() / want.norm())
        errors[f"{layer}.relu_lrn_pool_grad_rel_error"] = float((got_grad - want_grad).norm() / want_grad.norm())
    return errors
