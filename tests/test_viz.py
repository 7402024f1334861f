"""Pictures of a run (alexnet_dist.viz): filters, saturation, curves, CLI errors, bench chart.

A small AlexNet gets grey (R = G = B) gratings as tower 0's conv1 kernels and coloured
blobs as tower 1's, and is saved both as an exported file and as a run directory with a
hand-made complete checkpoint and a metrics.jsonl.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_dist.model import AlexNet
from alexnet_dist.viz import kernel_saturation, main, plot_bench, plot_curves, read_metrics, tower_kernels

WIDTH_MULT = 0.25  # 12 conv1 kernels per tower
NUM_CLASSES = 4
STEP = 300  # of the checkpoint, the last step of synthetic_metrics()
KERNEL = 11


def grey_gratings(n: int) -> torch.Tensor:
    """n x 3 x 11 x 11 oriented gratings under a Gaussian window, the same in R, G and B."""
    y, x = np.mgrid[:KERNEL, :KERNEL] - KERNEL // 2
    kernels = []
    for i in range(n):
        angle, period = math.pi * i / n, 3.0 + 3.0 * (i % 3)
        wave = np.cos(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        kernels.append(wave * np.exp(-(x**2 + y**2) / 18.0))
    return 0.01 * torch.tensor(np.array(kernels), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)


def colour_blobs(n: int) -> torch.Tensor:
    """n x 3 x 11 x 11 Gaussian blobs, each in its own colour."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[:KERNEL, :KERNEL] - KERNEL // 2
    kernels = []
    for i in range(n):
        hue = 2 * math.pi * (i * 0.382 % 1.0)  # hues spread round the colour circle
        colour = np.cos(hue - 2 * math.pi * np.arange(3) / 3) + rng.uniform(-0.3, 0.3)
        cy, cx = rng.uniform(-1.5, 1.5, size=2)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(2.0, 3.5) ** 2))
        kernels.append(colour[:, None, None] * blob)
    return 0.01 * torch.tensor(np.array(kernels), dtype=torch.float32)


def synthetic_model(width_mult: float = WIDTH_MULT) -> AlexNet:
    model = AlexNet(num_classes=NUM_CLASSES, width_mult=width_mult, seed=0)
    with torch.no_grad():
        for tower, make in (("tower0", grey_gratings), ("tower1", colour_blobs)):
            conv1 = model.towers[tower].features[0]
            conv1.weight.copy_(make(conv1.out_channels))
    return model


def synthetic_metrics(steps: int = 300, val_every: int = 50) -> list[dict]:
    """A plausible metrics.jsonl: noisy falling loss, step-decayed lr, rising accuracy."""
    rng = np.random.default_rng(0)
    lines = []
    for step in range(1, steps + 1):
        loss = math.log(NUM_CLASSES) * math.exp(-step / 150) + 0.3 + 0.08 * rng.normal()
        lr = 0.01 * 0.1 ** (step // 120)
        lines.append({"step": step, "epoch": step // 100, "loss": loss, "lr": lr, "images_per_sec": 900.0})
        if step % val_every == 0:
            val_loss = math.log(NUM_CLASSES) * math.exp(-step / 150) + 0.45
            top1 = 0.25 + 0.6 * (1 - math.exp(-step / 120))
            lines.append({"step": step, "split": "val", "loss": val_loss, "top1": top1, "top5": min(1.0, top1 + 0.3)})
    return lines


def write_checkpoint(run_dir: Path, model: AlexNet, complete: bool = True) -> Path:
    """The layout alexnet_dist.checkpoint writes, by hand: a file per tower, meta, COMPLETE."""
    path = run_dir / "checkpoints" / f"step{STEP:08d}"
    path.mkdir(parents=True)
    for t in (0, 1):
        weights = {k: v for k, v in model.state_dict().items() if k.startswith(f"towers.tower{t}.")}
        torch.save({"weights": weights, "momentum": {}}, path / f"tower{t}.pt")
    meta = {"num_classes": NUM_CLASSES, "width_mult": WIDTH_MULT, "dropout": 0.5, "step": STEP}
    (path / "meta.json").write_text(json.dumps(meta))
    if complete:
        (path / "COMPLETE").write_text("")
    return path


def write_metrics(run_dir: Path, lines: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def printed_saturations(out: str) -> list[float]:
    return [float(line.split()[-1]) for line in out.splitlines() if line.startswith("tower ")]


@pytest.fixture(scope="module")
def model() -> AlexNet:
    return synthetic_model()


@pytest.fixture
def run_dir(tmp_path: Path, model: AlexNet) -> Path:
    run = tmp_path / "run"
    write_checkpoint(run, model)
    write_metrics(run, synthetic_metrics())
    return run


@pytest.fixture
def model_file(tmp_path: Path, model: AlexNet) -> Path:
    path = tmp_path / "exported" / "alexnet.pt"
    path.parent.mkdir()
    blob = {"num_classes": NUM_CLASSES, "width_mult": WIDTH_MULT, "dropout": 0.5}
    torch.save({"model": blob, "state_dict": model.state_dict(), "step": STEP}, path)
    return path


def test_grey_tower_has_no_saturation_and_the_coloured_one_does(model):
    grey, coloured = (float(kernel_saturation(k).mean()) for k in tower_kernels(model))
    assert grey == pytest.approx(0.0, abs=1e-6)
    assert coloured > grey + 0.2


def test_saturation_ignores_scale_and_offset_but_not_colour():
    rng = np.random.default_rng(0)
    kernels = rng.normal(size=(4, KERNEL, KERNEL, 3))
    assert np.allclose(kernel_saturation(kernels), kernel_saturation(5.0 * kernels - 3.0))
    grey = np.repeat(kernels[..., :1], 3, axis=3)
    tinted = grey + np.array([0.0, 0.0, 2.0])  # the same pattern with a blue cast
    assert np.allclose(kernel_saturation(grey), 0.0)
    assert (kernel_saturation(tinted) > 0.2).all()


def test_run_dir_gives_filters_and_curves(run_dir, capsys):
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name, (min_w, min_h) in (("filters.png", (600, 300)), ("curves.png", (1200, 400))):
        w, h = png_size(run_dir / name)
        assert min_w <= w <= 4000 and min_h <= h <= 3000, (name, w, h)
    grey, coloured = printed_saturations(out)
    assert grey == 0.0 and coloured > 0.2


def test_model_file_gives_filters_only_and_the_same_numbers(run_dir, model_file, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "from_run")]) == 0
    from_run = printed_saturations(capsys.readouterr().out)
    out_dir = tmp_path / "pictures"
    assert main([str(model_file), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert printed_saturations(out) == from_run
    assert "skipped curves.png" in out
    png_size(out_dir / "filters.png")
    assert not (out_dir / "curves.png").exists()


def test_a_checkpoint_of_an_earlier_version_still_draws_the_same(run_dir, model, tmp_path, capsys):
    """Before checkpoints were layout-free, DeepSpeed's one model-states file held the network."""
    assert main([str(run_dir), "--out", str(tmp_path / "new")]) == 0
    new = printed_saturations(capsys.readouterr().out)
    old = write_checkpoint(tmp_path / "old", model)
    for f in old.glob("tower*.pt"):
        f.unlink()
    torch.save({"module": model.state_dict()}, old / "mp_rank_00_model_states.pt")
    write_metrics(tmp_path / "old", synthetic_metrics())
    assert main([str(tmp_path / "old"), "--out", str(tmp_path / "drawn")]) == 0
    assert printed_saturations(capsys.readouterr().out) == new


def test_default_out_for_a_file_is_its_folder(model_file):
    assert main([str(model_file)]) == 0
    png_size(model_file.parent / "filters.png")


def _missing(tmp_path: Path, model: AlexNet) -> Path:
    return tmp_path / "no_such_run"


def _incomplete_checkpoint(tmp_path: Path, model: AlexNet) -> Path:
    write_checkpoint(tmp_path, model, complete=False)
    write_metrics(tmp_path, synthetic_metrics(20))
    return tmp_path


def _garbage_file(tmp_path: Path, model: AlexNet) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a model\x00\x01")
    return path


def _no_metrics(tmp_path: Path, model: AlexNet) -> Path:
    write_checkpoint(tmp_path, model)
    return tmp_path


def _bad_metrics_line(tmp_path: Path, model: AlexNet) -> Path:
    write_checkpoint(tmp_path, model)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n{"step": 2, "loss"\n')
    return tmp_path


@pytest.mark.parametrize("make, says", [
    (_missing, "no such file or directory"),
    (_incomplete_checkpoint, "no complete checkpoint"),
    (_garbage_file, "is not a model file"),
    (_no_metrics, "metrics.jsonl: no such file"),
    (_bad_metrics_line, "metrics.jsonl:2: not JSON"),
])
def test_user_errors_are_one_line_and_exit_2(make, says, tmp_path, model, capsys):
    path = make(tmp_path, model)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and says in captured.err
    assert not list(tmp_path.rglob("*.png"))


def test_curves_of_a_run_without_validation_yet(tmp_path):
    train = synthetic_metrics(steps=3, val_every=10)
    plot_curves(train, [], tmp_path / "curves.png", "early run")
    w, h = png_size(tmp_path / "curves.png")
    assert w >= 1200 and h >= 400


def test_module_entry_point_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "alexnet_dist.viz", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no such file or directory" in done.stderr


def test_unterminated_last_line_and_other_splits_are_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "split": "val", "loss": 1.0, "top1": 0.5, "top5": 1.0}\n'
                    '{"step": 2, "split": "test", "acc": 0.4}\n{"step": 3, "lo')
    train, val = read_metrics(path)
    assert [r["step"] for r in train] == [1] and [r["step"] for r in val] == [2]


@pytest.mark.parametrize("result", [
    {"what": "model", "images_per_sec": 410.0, "baseline_images_per_sec": 305.5, "device": "cpu (x86_64, 2 threads)",
     "variants": {"tower_parallel": {"images_per_sec": 410.0}, "single_process": {"images_per_sec": 380.2},
                  "ddp_torchvision": {"images_per_sec": 305.5}, "pipeline_deepspeed": {"images_per_sec": 250.0}}},
    {"what": "data", "images_per_sec": 2100.0, "baseline_images_per_sec": 700.0},
    {"what": "train", "images_per_sec": 390.0,
     "variants": {"end_to_end": {"images_per_sec": 390.0}, "model_only": {"images_per_sec": 410.0}}},
], ids=["model", "data", "train"])
def test_plot_bench_writes_a_png(result, tmp_path):
    plot_bench(result, tmp_path / "bench.png")
    w, h = png_size(tmp_path / "bench.png")
    assert w >= 600 and h >= 150
