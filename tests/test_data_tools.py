"""Demo data set, PCA and down-sampling tools, eigen files, benchmark helpers, and a machine without DALI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import data_pipeline
from alexnet_dist.bench.data import measure_pipeline, measure_torchvision_baseline
from data_pipeline import DataError, ensure_demo_dataset, list_images, load_eigen
from data_pipeline.demo import DEMO_CLASSES
from data_pipeline.downsample import main as downsample_main
from data_pipeline.eigen import IMAGENET_EIGVAL
from data_pipeline.pca import main as pca_main
from data_pipeline.photos import make_benchmark_photos
from tests.data_fixtures import make_photo_folder, numbered, train_feed


def test_demo_dataset_is_made_once_atomically(tmp_path):
    cache = str(tmp_path / "cache")
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_dataset(cache))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    train_dir, val_dir = results[0]
    assert [name for name in os.listdir(cache) if not name.endswith(".lock")] == ["demo-v2"]  # no temporary copy left
    train, val = list_images(train_dir), list_images(val_dir)
    assert train.classes == val.classes == sorted(DEMO_CLASSES)
    assert len(train) == 300 and len(val) == 100
    with Image.open(train.files[0]) as im:
        assert im.size == (256, 256) and im.format == "JPEG"
    stamp = os.stat(train.files[0]).st_mtime_ns
    assert ensure_demo_dataset(cache) == (train_dir, val_dir)
    assert os.stat(train.files[0]).st_mtime_ns == stamp  # not regenerated


def test_pca_tool_writes_a_file_load_eigen_reads(tmp_path, capsys):
    root = make_photo_folder(str(tmp_path / "data"), {"a": 6, "b": 6})
    out = str(tmp_path / "pca.json")
    assert pca_main([root, "--out", out, "--images", "10", "--pixels", "200"]) == 0
    assert "wrote" in capsys.readouterr().out
    eigval, eigvec = load_eigen(out)
    assert eigval.shape == (3,) and (np.diff(eigval) <= 0).all() and (eigval >= 0).all()
    assert np.allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-6)  # orthonormal columns
    assert json.load(open(out))["images"] == 10


def test_pca_tool_and_eigen_errors_are_one_line(tmp_path, capsys):
    assert pca_main([str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err
    (tmp_path / "bad.json").write_text('{"eigval": [1, 2]}')
    with pytest.raises(DataError, match="bad.json"):
        load_eigen(tmp_path / "bad.json")
    assert np.allclose(load_eigen(None)[0], IMAGENET_EIGVAL)


def _halves(path, size, left=(255, 0, 0), right=(0, 0, 255)):
    """An image whose left half is ``left`` and right half ``right``."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2], pixels[:, w // 2:] = left, right
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_downsample_tool_rescales_and_centre_crops_like_the_paper(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _halves(src / "a" / "wide.png", (128, 64))  # rescaled to 64x32, then the centre 32x32: half red, half blue
    _halves(src / "b" / "deep" / "tall.JPEG", (64, 128), left=(0, 255, 0), right=(0, 255, 0))
    assert downsample_main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    assert "wrote 2 images of 32x32" in capsys.readouterr().out
    copy = list_images(dst)
    assert copy.classes == ["a", "b"]
    assert [os.path.relpath(f, dst) for f in copy.files] == ["a/wide.jpg", "b/deep/tall.JPEG"]  # JPEG names kept
    with Image.open(copy.files[0]) as im:
        assert im.size == (32, 32) and im.format == "JPEG"
        pixels = np.asarray(im.convert("RGB"), dtype=int)
    assert np.abs(pixels[:, :12] - [255, 0, 0]).max() < 40 and np.abs(pixels[:, 20:] - [0, 0, 255]).max() < 40
    stamp = os.stat(copy.files[0]).st_mtime_ns
    os.remove(copy.files[1])  # as if interrupted: only the missing file is made again
    assert downsample_main([str(src), str(dst), "--size", "32", "--workers", "1"]) == 0
    assert "wrote 1 images of 32x32 to" in capsys.readouterr().out and os.stat(copy.files[0]).st_mtime_ns == stamp


def test_downsample_tool_names_the_files_it_could_not_read(tmp_path, capsys):
    src = tmp_path / "src"
    _halves(src / "a" / "good.jpg", (40, 30))
    (src / "a" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    assert downsample_main([str(src), str(tmp_path / "dst"), "--size", "16", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 files did not decode" in err and "a/truncated.jpg" in err
    assert list_images(tmp_path / "dst").files == [str(tmp_path / "dst" / "a" / "good.jpg")]
    assert downsample_main([str(src), str(src / "a" / "copy"), "--size", "16"]) == 1
    assert "overlap" in capsys.readouterr().err
    _halves(src / "a" / "good.png", (40, 30))  # would become good.jpg too
    assert downsample_main([str(src), str(tmp_path / "dst2"), "--size", "16"]) == 1
    assert "would share a name in the copy" in capsys.readouterr().err and not (tmp_path / "dst2").exists()


def test_benchmark_helpers_measure_both_loaders(tmp_path):
    root = make_benchmark_photos(str(tmp_path / "photos"), 8, size=(96, 72), classes=2)
    images = list_images(root)
    with Image.open(images.files[0]) as im:
        assert im.size == (96, 72)
    common = dict(batch_size=4, steps=2, warmup=1, image_size=56, resize=64)
    dali = measure_pipeline(images, num_threads=1, **common)
    base = measure_torchvision_baseline(images, workers=0, **common)
    for result in (dali, base):
        assert result["images_per_sec"] > 0 and result["p95_step_s"] >= result["median_step_s"] > 0
        assert 0 <= result["cpu_time_share"]


def test_missing_dali_is_a_one_line_error_with_the_fix(monkeypatch):
    monkeypatch.delitem(sys.modules, "data_pipeline.pipelines", raising=False)
    monkeypatch.delattr(data_pipeline, "pipelines", raising=False)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what an absent package looks like to import
    fix = r"^NVIDIA DALI is not importable here \(.*\): pip install nvidia-dali-cuda130$"
    with pytest.raises(DataError, match=fix):
        train_feed(numbered(["x.jpg"] * 8))


def test_the_input_package_imports_nothing_of_the_trainer():
    """data_pipeline stands alone: every module of it imports without alexnet_dist."""
    code = ("import pkgutil, importlib, sys, data_pipeline\n"
            "for m in pkgutil.iter_modules(data_pipeline.__path__):\n"
            "    importlib.import_module('data_pipeline.' + m.name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alexnet_dist', 'tests')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
