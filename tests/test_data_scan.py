"""Listing ImageFolder trees and the pre-training scan: every broken case named, oddities kept, cache, skip."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch

from data_pipeline import DataError, list_images, scan_and_filter
from data_pipeline import scan as scan_module
from tests.data_fixtures import make_photo_folder, train_feed, write_broken_files, write_odd_images


@pytest.fixture
def folder(tmp_path):
    root = make_photo_folder(str(tmp_path / "data"), {"b_cls": 5, "a_cls": 6})
    os.makedirs(tmp_path / "data" / "a_cls" / "nested")
    make_photo_folder(str(tmp_path / "data" / "a_cls" / "nested"), {"deeper": 1}, seed=3)
    (tmp_path / "data" / "a_cls" / "notes.txt").write_text("not an image")
    (tmp_path / "data" / "b_cls" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


def test_list_images_is_sorted_labelled_and_leaves_out_non_images(folder):
    images = list_images(folder)
    assert images.classes == ["a_cls", "b_cls"]
    assert len(images) == 12 and images.labels.dtype == np.int64
    assert images.labels.tolist() == [0] * 7 + [1] * 5
    assert images.files == sorted(images.files[:7]) + sorted(images.files[7:])
    assert any("nested/deeper" in f for f in images.files)
    assert sorted(images.ignored) == ["a_cls/notes.txt", "b_cls/.DS_Store"]
    assert "2 non-image files" in images.ignored_summary() and "\n" not in images.ignored_summary()
    assert list_images(folder).files == images.files  # deterministic


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("no_classes", "no class folders"),
    ("empty_class", "holds no images"),
    ("no_jpegs", "no JPEG images"),
])
def test_list_images_errors_name_the_path(tmp_path, case, expected):
    root = tmp_path / "root"
    if case != "missing":
        root.mkdir()
    if case == "no_classes":
        (root / "loose.jpg").write_bytes(b"x")
    if case == "empty_class":
        make_photo_folder(str(root), {"full": 1})
        (root / "empty").mkdir()
    if case == "no_jpegs":
        (root / "cls").mkdir()
        (root / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=expected) as err:
        list_images(root)
    assert str(root) in str(err.value) and "\n" not in str(err.value)


def test_every_broken_file_is_named_with_its_reason(folder, tmp_path):
    images = list_images(folder)
    reasons = write_broken_files(os.path.join(folder, "b_cls"), images.files[0])
    with pytest.raises(DataError) as err:
        scan_and_filter(list_images(folder), "error", str(tmp_path / "cache"), progress=False)
    message = str(err.value)
    assert message.startswith("5 files are not decodable images") and "\n" not in message
    for name, reason in reasons.items():
        assert f"{name} ({reason})" in message
    listing = message.split("full list in ")[1].split(" ")[0]
    assert sorted(line.split("\t")[1].strip() for line in open(listing)) == sorted(reasons.values())


def test_skip_mode_reports_once_and_trains_on_the_rest(folder, tmp_path, capsys):
    reasons = write_broken_files(os.path.join(folder, "a_cls"), list_images(folder).files[0])
    kept = scan_and_filter(list_images(folder), "skip", str(tmp_path / "cache"), progress=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("skipping 5 of 17 files") and "truncated.jpg (truncated)" in out[0]
    assert len(kept) == 12 and not set(map(os.path.basename, kept.files)) & set(reasons)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 56 * 56, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    feed = train_feed(kept, micro_batch_size=4)
    for images, labels in feed.epoch(0):  # every remaining file decodes in DALI
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


def test_decodable_oddities_pass_the_scan_and_train(tmp_path):
    make_photo_folder(str(tmp_path / "data"), {"odd": 1})
    odd = write_odd_images(str(tmp_path / "data" / "odd"))
    images = scan_and_filter(list_images(tmp_path / "data"), "error", str(tmp_path / "cache"), progress=False)
    assert len(images) == len(odd) + 1
    for roi_decode in (True, False):
        feed = train_feed(images, micro_batch_size=len(images), roi_decode=roi_decode)
        (batch, _), = list(feed.epoch(0))
        assert batch.shape == (len(images), 3, 56, 56) and torch.isfinite(batch).all()


def test_scan_cache_skips_unchanged_files_and_rechecks_changed_ones(folder, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    images = list_images(folder)
    scan_and_filter(images, "error", cache, progress=False)
    checked = []
    monkeypatch.setattr(scan_module, "check_image", lambda p: checked.append(p))
    assert scan_and_filter(images, "error", cache, progress=False).files == images.files
    assert checked == []
    os.utime(images.files[3], ns=(0, 12345))
    scan_and_filter(images, "error", cache, progress=False)
    assert checked == [images.files[3]]


def test_concurrent_scans_share_one_cache_safely(folder, tmp_path):
    cache = str(tmp_path / "cache")
    write_broken_files(os.path.join(folder, "a_cls"), list_images(folder).files[0])
    results, errors = [], []

    def scan():
        try:
            results.append(scan_and_filter(list_images(folder), "skip", cache, progress=False))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=scan) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [len(r) for r in results] == [12, 12, 12]
    (cache_file,) = [f for f in os.listdir(cache) if f.endswith(".json")]
    assert len(json.load(open(os.path.join(cache, cache_file)))["paths"]) == 17
    assert not [f for f in os.listdir(cache) if ".tmp" in f]
