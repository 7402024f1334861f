"""The fused ReLU + LRN + max-pool step: its kernels under Triton's interpreter (the cases are in
tests/fused_cases.py), and where the towers use it."""

import importlib.util
import os
import subprocess
import sys

import pytest

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
