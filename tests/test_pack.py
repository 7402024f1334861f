"""``python -m data_pipeline.pack``: plain tar shards of the original (or down-sampled) bytes,
an index read without a file per image, bad files, bad input, an interrupted pack killed
and finished, and training on a pack exactly as on its folder."""

from __future__ import annotations

import filecmp
import io
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from data_pipeline import DataError, list_images, load_eigen, open_images
from data_pipeline.downsample import downsample_bytes
from data_pipeline.pack import main as pack_main
from data_pipeline.pca import main as pca_main
from data_pipeline.packed import INDEX, WORK, member_key, shard_name
from tests.data_fixtures import make_photo_folder, packed, train_feed, write_broken_files
from tests.launch import EXACT, REPO, check, losses, records, train


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    return make_photo_folder(str(tmp_path_factory.mktemp("photos")), {"a": 13, "b": 12, "c": 11})


def _members(shard: str) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def _member_bytes(shard: str, name: str) -> bytes:
    with tarfile.open(shard) as tar:
        return tar.extractfile(name).read()


def _pack(*argv: str, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the command in this process."""
    try:
        status = pack_main(["--workers", "1", *argv])  # a --workers in argv comes later and wins
    except SystemExit as e:  # argparse's refusals
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def test_shards_are_plain_tars_of_the_files_bytes_and_the_index_finds_them(photos, tmp_path, capsys):
    dst = tmp_path / "packed"
    status, out, _ = _pack(photos, str(dst), "--shards", "3", capsys=capsys)
    assert status == 0 and f"packed 36 images of 3 classes into 3 shards" in out
    folder, pack = list_images(photos), open_images(dst)
    assert sorted(os.listdir(dst)) == [INDEX] + [shard_name(s) for s in range(3)]
    assert pack.classes == folder.classes and np.array_equal(pack.labels, folder.labels)
    sizes = [os.path.getsize(dst / shard_name(s)) for s in range(3)]
    assert max(sizes) < 1.5 * min(sizes)  # roughly equal
    listed = []
    for s in range(3):
        shard = str(dst / shard_name(s))
        names = subprocess.run(["tar", "tf", shard], capture_output=True, text=True, check=True).stdout.split()
        members = _members(shard)
        assert names == [m.name for m in members]
        assert {m.name.split(".")[0] for m in members[::2]} == {m.name.split(".")[0] for m in members[1::2]}
        assert {m.name.split(".")[1] for m in members} == {"jpg", "cls"}  # WebDataset: <key>.jpg + <key>.cls
        for jpg, cls in zip(members[::2], members[1::2]):
            i = int(jpg.name.split(".")[0])  # the key: the image's place in the folder's listing
            listed.append(i)
            assert _member_bytes(shard, jpg.name) == open(folder.files[i], "rb").read()
            assert int(_member_bytes(shard, cls.name)) == folder.labels[i]
            assert (pack.shard[i], pack.offset[i], pack.size[i]) == (s, jpg.offset_data, jpg.size)
    assert sorted(listed) == list(range(36))
    assert all(np.array_equal(pack.read(i), folder.read(i)) for i in range(36))
    assert not all(np.array_equal(pack.shard[:12], np.full(12, s)) for s in range(3))  # the classes are mixed


def test_resize_stores_the_papers_preparation(photos, tmp_path, capsys):
    status, _, _ = _pack(photos, str(tmp_path / "small"), "--resize", "32", "--shards", "2", capsys=capsys)
    pack, folder = open_images(tmp_path / "small"), list_images(photos)
    for i in (0, 17, 35):
        assert pack.read(i).tobytes() == downsample_bytes(folder.files[i], 32, 90)[0]
        with Image.open(io.BytesIO(pack.read(i).tobytes())) as im:
            assert im.size == (32, 32) and im.format == "JPEG"
    assert status == 0 and pack.name(0).endswith(f"(key {member_key(0)})")


def test_bad_files_are_named_then_skipped_at_pack_time(photos, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_photo_folder(str(src), {"a": 4, "b": 4})
    reasons = write_broken_files(str(src / "b"), str(src / "a" / "000.jpg"))
    status, _, err = _pack(str(src), str(dst), "--shards", "2", capsys=capsys)
    assert status == 1 and err.count("\n") == 1 and err.startswith("error: 5 files are not decodable images: ")
    for name, reason in reasons.items():
        assert f"b/{name} ({reason})" in err
    assert "--on-bad-file skip" in err and not (dst / INDEX).exists()
    with pytest.raises(DataError, match="is an unfinished pack"):
        open_images(dst)
    status, out, _ = _pack(str(src), str(dst), "--on-bad-file", "skip", "--shards", "2", capsys=capsys)
    assert status == 0 and "skipped 5 files that are not decodable images" in out
    assert "packed 8 images of 2 classes into 2 shards" in out and "kept 2 finished by an earlier run" in out
    assert len((dst / "skipped.txt").read_text().splitlines()) == 5
    pack, folder = open_images(dst), list_images(src)
    good = [i for i, f in enumerate(folder.files) if os.path.basename(f) not in reasons]
    assert pack.key.tolist() == good and all(np.array_equal(pack.read(j), folder.read(i)) for j, i in enumerate(good))


def test_files_changed_since_an_unfinished_pack_are_packed_again(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_photo_folder(str(src), {"a": 3, "b": 3})
    (src / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    assert _pack(str(src), str(dst), "--shards", "2", capsys=capsys)[0] == 1
    (src / "b" / "broken.jpg").write_bytes(open(src / "a" / "000.jpg", "rb").read())  # fixed
    status, out, _ = _pack(str(src), str(dst), "--shards", "2", capsys=capsys)
    assert status == 0 and "changed since the unfinished pack began: packed every shard again" in out
    assert len(open_images(dst)) == 7 and "kept" not in out


@pytest.mark.parametrize("case, expected", [
    ("missing_src", "does not exist"),
    ("no_images", "no JPEG images"),
    ("foreign_dst", "is not empty and not an unfinished pack"),
    ("finished_dst", "already holds a finished pack"),
    ("other_source", "holds an unfinished pack of"),
    ("other_options", "made with --shards 2 and no --resize: run the command again with those"),
    ("inside_src", "overlap"),
    ("too_many_shards", "--shards 99 is more than the 36 images"),
    ("zero_shards", "--shards must be positive, got 0"),
    ("zero_workers", "--workers must be positive"),
    ("bad_policy", "argument --on-bad-file: invalid choice: 'maybe'"),
    ("bad_quality", "--quality must be within 1..100"),
])
def test_every_bad_input_is_one_error_line(photos, tmp_path, capsys, case, expected):
    src, dst, extra = photos, tmp_path / "dst", []
    if case == "missing_src":
        src = str(tmp_path / "nowhere")
    elif case == "no_images":
        src = str(tmp_path / "empty")
        os.makedirs(os.path.join(src, "cls"))
        (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    elif case == "foreign_dst":
        dst.mkdir()
        (dst / "mine.txt").write_text("keep me")
    elif case == "finished_dst":
        packed(photos, str(dst), shards=2)
    elif case in ("other_source", "other_options"):
        other = make_photo_folder(str(tmp_path / "other"), {"x": 2}) if case == "other_source" else photos
        os.makedirs(dst / WORK)
        (dst / WORK / "plan.json").write_text(
            f'{{"options": {{"source": "{other}", "shards": 2, "resize": null, "quality": 90}}, '
            '"fingerprint": "f", "shards": 2}')
        extra = ["--shards", "3"] if case == "other_options" else ["--shards", "2"]
    elif case == "inside_src":
        dst = os.path.join(photos, "a", "packed")
    else:
        extra = {"too_many_shards": ["--shards", "99"], "zero_shards": ["--shards", "0"],
                 "zero_workers": ["--workers", "0"], "bad_policy": ["--on-bad-file", "maybe"],
                 "bad_quality": ["--quality", "0"]}[case]
    status, out, err = _pack(str(src), str(dst), *extra, capsys=capsys)
    assert status != 0 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    if case == "foreign_dst":
        assert os.listdir(dst) == ["mine.txt"]


def test_a_damaged_shard_is_one_line(photos, tmp_path):
    pack = packed(photos, str(tmp_path / "p"), shards=2)
    [pack.read(i) for i in range(len(pack))]  # both shards open
    with open(tmp_path / "p" / shard_name(1), "r+b") as f:
        f.truncate(1024)
    with pytest.raises(DataError, match=r"shard-000001.tar is 1024 bytes but the index says \d+: the shard is damaged"):
        open_images(tmp_path / "p")  # at start
    with pytest.raises(DataError, match="shard-000001.tar ends before the sample at byte"):  # mid-epoch
        [pack.read(i) for i in range(len(pack))]


def test_a_sample_that_does_not_decode_is_named_by_its_shard_and_key(photos, tmp_path):
    """DALI meets a truncated JPEG (here: sample 5's size halved in the index) and names its sample."""
    packed(photos, str(tmp_path / "p"), shards=2)
    with np.load(tmp_path / "p" / INDEX) as z:
        index = dict(z)
    index["size"][5] //= 2
    np.savez(tmp_path / "p" / INDEX, **index)
    pack = open_images(tmp_path / "p")
    with pytest.raises(DataError, match=rf"DALI could not decode \S*/shard-00000{pack.shard[5]}.tar \(key 00000005\): "):
        [x for x, _ in train_feed(pack, micro_batch_size=36, augment=False).epoch(0)]


def test_pca_reads_a_pack_as_its_folder(photos, tmp_path, capsys):
    packed(photos, str(tmp_path / "p"), shards=2)
    for source, out in ((photos, "folder.json"), (str(tmp_path / "p"), "packed.json")):
        assert pca_main([source, "--out", str(tmp_path / out), "--images", "12", "--pixels", "50"]) == 0
    assert np.array_equal(load_eigen(tmp_path / "folder.json")[0], load_eigen(tmp_path / "packed.json")[0])


def test_validation_classes_are_matched_by_name(photos, tmp_path):
    train = list_images(photos)
    val = make_photo_folder(str(tmp_path / "val"), {"b": 2, "c": 3}, seed=1)
    pack = packed(val, str(tmp_path / "val-packed"), shards=1)
    assert pack.classes == ["b", "c"]
    matched = open_images(tmp_path / "val-packed", train.classes)
    assert matched.classes == train.classes and matched.missing_classes == ["a"]
    assert matched.labels.tolist() == [1, 1, 2, 2, 2]
    with pytest.raises(DataError, match="has classes the training set does not: b, c"):
        open_images(tmp_path / "val-packed", ["a"])


# ---------------------------------------------------------------- real processes


def _pack_command(src: str, dst: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "data_pipeline.pack", src, dst, *extra]


def test_a_killed_pack_is_refused_then_finished_by_a_second_run(tmp_path):
    """SIGKILL mid-way (the pack and its workers): no index, training refuses it in one line,
    and the same command finishes it, keeping the shards already written, to the bytes of
    an uninterrupted pack."""
    src, dst = make_photo_folder(str(tmp_path / "src"), {"a": 200, "b": 200}, size=(64, 48)), tmp_path / "dst"
    args = ["--shards", "40", "--workers", "1", "--resize", "40"]
    proc = subprocess.Popen(_pack_command(src, str(dst), *args), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (dst / shard_name(0)).exists() and not (dst / shard_name(1)).exists():  # some shard is finished
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (dst / INDEX).exists(), "the pack finished before it was killed: give it more to do"
    with pytest.raises(DataError, match=f"is an unfinished pack .* run `python -m data_pipeline.pack {src} {dst}`"):
        open_images(dst)
    result = train("python", 1, tmp_path / "run", f"data.train_dir={dst}", "train.max_steps=1",
                   cache=tmp_path / "cache", timeout=120)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error")]
    assert result.returncode != 0 and len(errors) == 1 and "is an unfinished pack" in errors[0], result.stderr
    finished = subprocess.run(_pack_command(src, str(dst), *args), cwd=REPO, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 0 and "kept" in finished.stdout, finished.stdout + finished.stderr
    subprocess.run(_pack_command(src, str(tmp_path / "whole"), *args), cwd=REPO, check=True, capture_output=True,
                   timeout=300)
    assert sorted(os.listdir(dst)) == sorted(os.listdir(tmp_path / "whole"))
    _, mismatch, errors = filecmp.cmpfiles(dst, tmp_path / "whole", os.listdir(dst), shallow=False)
    assert mismatch == errors == []


@pytest.fixture(scope="module")
def data_sets(photos, tmp_path_factory) -> dict[str, list[str]]:
    """``data.*_dir`` settings of the photos and a validation folder, as folders and packed."""
    root = tmp_path_factory.mktemp("sets")
    val = make_photo_folder(str(root / "val"), {"a": 4, "b": 3, "c": 3}, seed=2)
    packed(photos, str(root / "packed"), shards=3)
    packed(val, str(root / "packed-val"), shards=1)
    return {"folder": [f"data.train_dir={photos}", f"data.val_dir={val}"],
            "packed": [f"data.train_dir={root / 'packed'}", f"data.val_dir={root / 'packed-val'}"]}


def _run(run_dir, launcher: str, ranks: int, *sets: str) -> tuple[list[float], list[dict]]:
    """(per-step losses, validation records) of a run of train.py."""
    check(train(launcher, ranks, run_dir, *sets, cache=run_dir.parent / "cache"))
    return losses(run_dir), records(run_dir, "val")


@pytest.fixture(scope="module")
def folder_exact(data_sets, tmp_path_factory) -> tuple[list[float], list[dict]]:
    return _run(tmp_path_factory.mktemp("folder-exact") / "run", "python", 1, *data_sets["folder"], *EXACT,
                "train.max_steps=4")


@pytest.mark.slow
def test_augmented_training_on_the_pack_equals_training_on_the_folder(data_sets, tmp_path):
    """Crops, flips, colour noise and dropout drawn from the same seed: the same losses and validation."""
    folder = _run(tmp_path / "folder", "python", 1, *data_sets["folder"], "train.seed=3", "train.max_steps=4")
    assert _run(tmp_path / "packed", "python", 1, *data_sets["packed"], "train.seed=3", "train.max_steps=4") == folder


@pytest.mark.slow
def test_exact_training_resumed_on_the_pack_equals_the_folder_uninterrupted(data_sets, folder_exact, tmp_path):
    _run(tmp_path / "packed", "python", 1, *data_sets["packed"], *EXACT, "train.max_steps=2")
    resumed, val = _run(tmp_path / "packed", "python", 1, *data_sets["packed"], *EXACT, "train.max_steps=4")
    assert resumed == folder_exact[0] and val[-1] == folder_exact[1][-1]


@pytest.mark.slow
def test_two_ranks_on_the_pack_keep_the_promise(data_sets, folder_exact, tmp_path):
    """One tower per rank, rank 0 reading the index and handing it over: the single process's losses."""
    two_ranks, _ = _run(tmp_path / "run", "deepspeed", 2, *data_sets["packed"], *EXACT, "train.max_steps=4")
    assert np.allclose(two_ranks, folder_exact[0], rtol=1e-4, atol=0)
