"""Each benchmark mode runs and writes the contract's keys (speed is the bench's job, not a test's)."""

import json
import subprocess
import sys

import pytest

from tests.launch import REPO

TINY = ["model.width_mult=0.125", "data.image_size=64", "data.resize=72", "train.micro_batch_size=8",
        "data.num_threads=1"]


def _bench(what: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / f"{what}.json"
    args = [sys.executable, "-m", "alexnet_dist.bench", what, "--json", str(out), "--steps", "2", "--warmup", "1",
            "--plot", str(tmp_path / f"{what}.png"), *extra]
    for s in [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]:
        args += ["--set", s]
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| variant | images/s |" in done.stdout
    assert (tmp_path / f"{what}.png").stat().st_size > 1000
    result = json.loads(out.read_text())
    assert result["what"] == what and result["images_per_sec"] > 0
    assert isinstance(result["device"], str) and result["world_size"] >= 1
    return result


@pytest.mark.slow
def test_bench_model_with_baselines(tmp_path):
    result = _bench("model", tmp_path, "--baseline")
    assert result["baseline_images_per_sec"] > 0
    assert set(result["variants"]) == {"tower_parallel", "single_process", "ddp_torchvision", "pipeline_deepspeed"}
    # width 1/8, 64 px input (3x3 maps at conv3), 1000 classes: per tower conv3 16x3x3, fc6 16x6x6,
    # fc7 and fc8 256 floats, sent forward and back, plus 500 logits forward
    assert result["exchange_bytes_per_image"] == 2 * 4 * (16 * 3 * 3 + 16 * 36 + 2 * 256) + 4 * 500


def test_bench_data_with_baseline(tmp_path):
    result = _bench("data", tmp_path, "--baseline")
    assert result["baseline_images_per_sec"] > 0 and len(result["ratios_per_round"]) == 3


@pytest.mark.slow
def test_bench_train_end_to_end(tmp_path):
    result = _bench("train", tmp_path)
    assert result["exchange_bytes_per_image"] > 0
    assert 0 < result["end_to_end_vs_model_only"]
    assert 0 <= result["variants"]["end_to_end"]["data_wait_share"] < 1
