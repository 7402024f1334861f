"""The fused ReLU + LRN + max-pool kernels (alexnet_dist.fused) against the eager float64 reference.

Runs where the kernels can: on a GPU, compiled (``python -m pytest tests/fused_cases.py``,
as launch/gpu_checks.sh does), or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1 python -m pytest tests/fused_cases.py``, which tests/test_fused.py runs
in a child process: the variable must be set before the kernels are defined, so the suite's
own process never switches). Not collected by the suite itself (no ``test_`` prefix).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from alexnet_dist.fused import relu_lrn_pool
from alexnet_dist.model import _lrn

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
PAPER = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
# Elementwise tolerance for each precision: its rounding of the result (the interpreter
# truncates bf16 where a GPU rounds to nearest, so bf16 allows 2^-7), float32 arithmetic inside.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (compiled kernels)")


def reference(x: torch.Tensor, size=5, alpha=1e-4, beta=0.75, k=2.0) -> torch.Tensor:
    """The eager layers' function, as the model runs them on CPUs."""
    return F.max_pool2d(_lrn(F.relu(x), size, alpha, beta, k), 3, 2)


def conv_like(shape, dtype, channels_last=False, seed=0) -> torch.Tensor:
    """Signed values up to ~600, as conv1 gives on images: squares overflow fp16 and the
    LRN's denominator reaches several times k, so the normalisation matters."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 150).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return x.to(DEVICE)


def check_against_float64(x: torch.Tensor, **lrn) -> None:
    """Values and input gradient of the kernels against float64 autograd through the eager
    layers on the same (already rounded) input and output gradient."""
    x = x.detach().requires_grad_()
    out = relu_lrn_pool(x, **lrn)
    grad = conv_like(out.shape, x.dtype, seed=1)
    out.backward(grad)
    want_x = x.detach().cpu().double().requires_grad_()
    want = reference(want_x, **lrn)
    want.backward(grad.cpu().double())
    assert out.dtype == x.dtype and out.shape == want.shape
    assert x.grad.dtype == x.dtype and x.grad.stride() == x.stride()
    rtol = RTOL[x.dtype]
    assert_close(out, want.detach(), rtol)
    assert_close(x.grad, want_x.grad, rtol)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Elementwise within ``rtol``, near zero within ``rtol`` of the largest value: a gradient
    is a difference of two terms and may cancel."""
    scale = float(want.nan_to_num().abs().max())
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=rtol, atol=rtol * scale, equal_nan=True)


@pytest.mark.parametrize("shape, dtype, channels_last", [
    ((2, 1, 13, 13), torch.float32, False),   # one channel: the LRN window hits both edges
    ((2, 2, 29, 11), torch.float32, True),
    ((3, 3, 15, 13), torch.float32, False),
    ((2, 5, 14, 13), torch.float32, False),   # even height: the last row is in no window
    ((2, 7, 13, 9), torch.float32, True),
    ((1, 96, 3, 5), torch.float32, True),     # channels over three programs' tiles, halos across them
    ((2, 5, 13, 27), torch.bfloat16, False),
    ((2, 6, 9, 11), torch.bfloat16, True),
    ((3, 3, 13, 13), torch.float16, False),
    ((2, 6, 13, 11), torch.float16, True),
])
def test_values_and_gradients_match_float64(shape, dtype, channels_last):
    check_against_float64(conv_like(shape, dtype, channels_last))


@pytest.mark.parametrize("lrn", [dict(size=3, alpha=1e-3, beta=1.0, k=1.0), dict(size=4, alpha=5e-4, beta=0.6, k=1.5)])
def test_other_lrn_constants_and_an_even_window(lrn):
    check_against_float64(conv_like((2, 6, 13, 13), torch.float32), **lrn)


def test_expanded_output_gradient():
    # (x.sum() backward hands every output the same gradient through a stride-0 view)
    x = conv_like((2, 3, 13, 13), torch.float32).requires_grad_()
    relu_lrn_pool(x).sum().backward()
    want_x = x.detach().cpu().double().requires_grad_()
    reference(want_x).sum().backward()
    assert_close(x.grad, want_x.grad, 1e-5)


def test_an_off_by_one_pool_or_lrn_window_would_show():
    # One position (4, 5) of a 9x9 map holds 1 in each of 8 channels and 100 in channel 4;
    # the rest is 0. Row 4 lies in pool windows 1 and 2 (rows 2-4 and 4-6), column 5 in window 2
    # only (columns 4-6); 100^2 * alpha doubles the LRN's denominator for channels 2..6 alone.
    x = torch.zeros(1, 8, 9, 9, dtype=torch.float32)
    x[0, :, 4, 5] = 1.0
    x[0, 4, 4, 5] = 100.0
    x = x.to(DEVICE).requires_grad_()
    out = relu_lrn_pool(x)
    lit = {tuple(p) for p in out[0].detach().amax(0).nonzero().tolist()}
    assert lit == {(1, 2), (2, 2)}
    ones = out[0, :, 1, 2].detach().cpu()
    dimmed = {c for c in range(8) if c != 4 and ones[c] < 0.9 * ones[0]}
    assert dimmed == {2, 3, 5, 6}
    torch.testing.assert_close(out[0, :, 1, 2], out[0, :, 2, 2])
    # Backward: channel 4's pooled value at window (1, 2) reaches exactly the channels of
    # its LRN window, at the one position that won.
    grad = torch.zeros_like(out)
    grad[0, 4, 1, 2] = 1.0
    out.backward(grad)
    touched = {tuple(p) for p in x.grad[0].nonzero().tolist()}
    assert touched == {(c, 4, 5) for c in range(2, 7)}


def test_ties_go_to_the_first_position_of_the_window_as_in_max_pool():
    x = torch.full((1, 3, 7, 7), 5.0, device=DEVICE, requires_grad=True)  # every window one value
    relu_lrn_pool(x).sum().backward()
    want_x = x.detach().cpu().double().requires_grad_()
    reference(want_x).sum().backward()
    assert_close(x.grad, want_x.grad, 1e-5)


def test_nan_spreads_as_in_the_eager_layers():
    x = conv_like((1, 6, 9, 9), torch.float32)
    x[0, 2, 3, 3] = float("nan")
    out = relu_lrn_pool(x)
    want = reference(x.cpu().double())
    assert out.isnan().any()
    assert_close(out, want, 1e-5)


def test_maps_smaller_than_the_window_are_refused():
    with pytest.raises(ValueError, match="at least 3x3"):
        relu_lrn_pool(torch.ones(1, 2, 2, 5, device=DEVICE))


@gpu_only
def test_no_host_sync_in_either_direction():
    x = conv_like((8, 48, 55, 55), torch.bfloat16, channels_last=True).requires_grad_()
    relu_lrn_pool(x).sum().backward()  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        relu_lrn_pool(x).backward(torch.ones(8, 48, 27, 27, device=DEVICE, dtype=torch.bfloat16))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@gpu_only
@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_the_model_takes_the_fused_step_on_the_gpu(monkeypatch, dtype, rtol):
    """The whole network on the GPU runs both towers' two fused steps and gives the float64
    CPU network's logits (relative norm error)."""
    import alexnet_dist.fused
    from alexnet_dist.model import AlexNet

    calls = []
    monkeypatch.setattr(alexnet_dist.fused, "relu_lrn_pool", lambda *a: calls.append(a) or relu_lrn_pool(*a))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = AlexNet(10, width_mult=0.25, dropout=0.0, init="kaiming", seed=0).double()
    x = torch.randn(4, 3, 96, 96, dtype=torch.float64) * 50
    want = model(x)
    got = model.to(DEVICE, dtype)(x.to(DEVICE, dtype).contiguous(memory_format=torch.channels_last))
    assert len(calls) == 4
    assert float((got.double().cpu() - want).norm() / want.norm()) < rtol


@gpu_only
def test_a_training_step_of_the_model_makes_no_host_sync():
    from alexnet_dist.model import AlexNet

    model = AlexNet(10, width_mult=0.25, seed=0).to(DEVICE, torch.bfloat16).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(16, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=DEVICE)

    def step():
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # compiles, allocates the optimizer's state and the dropout generators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
