"""The fused ReLU + LRN + max-pool step: its kernels under Triton's interpreter (the cases are in
tests/fused_cases.py), and where the towers use it."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from alexnet_dist.model import AlexNet, LocalResponseNorm, ReLULRNPool
from tests.launch import REPO


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernel_cases_pass_under_the_interpreter():
    # A child process: TRITON_INTERPRET must be set before the kernels are defined.
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fused_cases.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


def test_the_towers_fuse_the_steps_after_conv1_and_conv2_and_keep_the_weight_names():
    model = AlexNet(num_classes=10, width_mult=0.125)
    tower = model.towers["tower0"]
    fused = {layer.name: step for run, _ in tower.segments() for layer in run for step in layer.steps
             if isinstance(step, ReLULRNPool)}
    assert set(fused) == {"tower0.conv1", "tower0.conv2"}
    assert fused["tower0.conv1"].layers == tuple(tower.features[1:4])
    assert fused["tower0.conv2"].layers == tuple(tower.features[5:8])
    weighted = [f"features.{i}" for i in (0, 4, 9, 11, 13)] + [f"classifier.{i}" for i in (2, 6, 10)]
    assert list(model.state_dict()) == [f"towers.tower{t}.{layer}.{p}" for t in (0, 1) for layer in weighted
                                        for p in ("weight", "bias")]


def test_off_the_gpu_the_step_is_the_three_layers():
    step = ReLULRNPool(nn.ReLU(inplace=True), LocalResponseNorm(), nn.MaxPool2d(3, 2))
    x = torch.randn(2, 6, 13, 13) * 100
    want = nn.MaxPool2d(3, 2)(LocalResponseNorm()(torch.relu(x)))
    assert torch.equal(step(x.clone()), want)
    assert not ReLULRNPool.fits([nn.ReLU(), LocalResponseNorm(), nn.MaxPool2d(3, 1)])
    assert not ReLULRNPool.fits([nn.ReLU(), nn.MaxPool2d(3, 2)])


def test_the_forward_shows_a_range_per_layer_in_the_profiler():
    model = AlexNet(num_classes=10, width_mult=0.125)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(torch.randn(2, 3, 64, 64))
    ranges = {e.key for e in prof.key_averages() if e.key.startswith("tower")}
    layers = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
    assert ranges == {f"tower{t}.{name}" for t in (0, 1) for name in layers}
