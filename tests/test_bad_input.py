"""Bad input through train.py: each case one clear ``error [rank r/w]: ...`` line and a
non-zero exit, or (skip mode) training on what is usable.

Extends tests/test_train.py's list (unknown key, ill-typed value, missing train folder,
odd world size, checkpoint of another width live there) with: broken and odd JPEGs in
both modes, empty folders, a missing validation folder, more config mistakes, ``--set``
without ``=``, a run.dir that
cannot be written, and a hostfile whose first host cannot be reached.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import require_root
from tests.data_fixtures import make_photo_folder, write_broken_files, write_odd_images
from tests.launch import BIN, REPO
from tests.reliability import dataset_cache, error_lines, metric_steps, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return dataset_cache(tmp_path_factory)


def _one_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The single ``error`` line (non-zero exit), holding every needle."""
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    errors = error_lines(text)
    assert len(errors) == 1, text[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------- configuration (in-process:
# these stop before torch.distributed starts, exactly as `python train.py ...` does)

@pytest.mark.parametrize("argv, message", [
    (["--set", "train.max_steps"], "--set 'train.max_steps' needs the form key=value"),
    (["--set", "nosuch.key=1"], "unknown config key nosuch"),
    (["--set", "train=5"], "must be a mapping, got 5"),
    (["--set", "data.on_bad_file=maybe"], "data.on_bad_file must be one of 'error', 'skip'; got 'maybe'"),
    (["--set", "train.max_steps=[1"], "value is not valid YAML"),
    (["--set", "data.decode_ahead=-1"], "data.decode_ahead must be at least 0, got -1"),
    (["--config", "/no/such/config.yaml"], "cannot read config file /no/such/config.yaml"),
])
def test_config_mistakes_are_one_line(argv, message, capsys):
    from alexnet_dist.job import main

    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error [rank 0/1]: ") and message in err[0], err


def test_numbers_are_taken_as_a_user_types_them():
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float key takes it as the number it is."""
    from alexnet_dist.config import load_config

    cfg = load_config(None, ["train.lr=1e-3", "train.weight_decay=5E-4", "model.width_mult=.5"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.model.width_mult) == (1e-3, 5e-4, 0.5)


def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, capsys):
    from alexnet_dist.job import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 3\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"config file {bad} is not valid YAML" in err[0], err


def test_set_without_equals_through_train_py():
    """The same check as above, once through the script itself."""
    bad = subprocess.run([str(BIN / "python"), str(REPO / "train.py"), "--set", "train.max_steps"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    _one_error(bad, "needs the form key=value")


# ---------------------------------------------------------------- images and folders


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory) -> tuple[Path, dict[str, str], list[str]]:
    """Class a: 7 odd but decodable images + the 5 kinds of broken file; class b: 9 photos.
    16 decodable images: 2 steps of 8 cover each once."""
    root = tmp_path_factory.mktemp("messy")
    make_photo_folder(str(root), {"a": 0, "b": 9})
    odd = [os.path.basename(p) for p in write_odd_images(str(root / "a"))]
    broken = write_broken_files(str(root / "a"), str(root / "b" / "000.jpg"))
    return root, broken, odd


def test_broken_jpegs_in_error_mode_name_every_broken_file_and_no_odd_one(messy_folder, tmp_path, cache):
    root, broken, odd = messy_folder
    line = _one_error(train("python", 1, tmp_path, f"data.train_dir={root}", "data.on_bad_file=error",
                            cache=cache, timeout=180),
                      f"{len(broken)} files are not decodable images", "data.on_bad_file=skip")
    for name, reason in broken.items():
        assert f"a/{name} ({reason})" in line
    for name in odd:
        assert name not in line


def test_skip_mode_trains_on_the_rest_odd_jpegs_included(messy_folder, tmp_path, cache):
    root, broken, odd = messy_folder
    result = train("python", 1, tmp_path, f"data.train_dir={root}", "data.on_bad_file=skip", "train.max_steps=2",
                   cache=cache, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    skipped = [line for line in out.splitlines() if line.startswith("skipping ")]
    assert len(skipped) == 1 and f"skipping {len(broken)} of {len(broken) + 16} files" in skipped[0], out[-3000:]
    assert not any(name in skipped[0] for name in odd)
    assert metric_steps(tmp_path) == [1, 2]  # one epoch of the 16 usable images, odd ones included


@pytest.mark.parametrize("case", ["no class folders", "an empty class folder", "a missing val folder"])
def test_empty_or_missing_folders_are_one_line(case, tmp_path, cache):
    good = make_photo_folder(str(tmp_path / "good"), {"a": 2, "b": 2})
    if case == "no class folders":
        (tmp_path / "empty").mkdir()
        sets, needle = [f"data.train_dir={tmp_path / 'empty'}"], f"no class folders in {tmp_path / 'empty'}"
    elif case == "an empty class folder":
        (tmp_path / "good" / "c").mkdir()
        sets, needle = [f"data.train_dir={good}"], f"class folder {tmp_path / 'good' / 'c'} holds no images"
    else:
        sets, needle = [f"data.train_dir={good}", "data.val_dir=/no/such/val"], "data folder /no/such/val does not exist"
    _one_error(train("python", 1, tmp_path / "run", *sets, cache=cache, timeout=120), needle)


# ---------------------------------------------------------------- run.dir and checkpoints


@pytest.mark.cluster  # root: mounts a read-only file system
def test_a_run_dir_that_cannot_be_written_is_one_line(tmp_path, cache):
    require_root("mounts a read-only file system")
    mount = tmp_path / "readonly"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    try:  # root ignores file modes: a read-only file system stops it
        _one_error(train("python", 1, mount / "run", cache=cache, timeout=120),
                   f"run.dir {mount / 'run'} is not writable: Read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ---------------------------------------------------------------- launcher


def test_a_hostfile_whose_first_host_cannot_be_reached_fails_at_once(tmp_path, cache):
    """DeepSpeed's runner checks the first host over ssh before starting anything. The
    name never reaches DNS: an ssh config on PATH maps it to a closed port on loopback."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nohost.invalid slots=2\nlocalhost slots=2\n")
    config = tmp_path / "ssh_config"
    config.write_text("Host nohost.invalid\n  HostName 127.0.0.1\n  Port 1\n  BatchMode yes\n  ConnectTimeout 5\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {config} "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{BIN}:{os.environ['PATH']}")
    started = time.monotonic()
    result = subprocess.run([str(BIN / "deepspeed"), "--hostfile", str(hostfile), str(REPO / "train.py"),
                             "--set", f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    last = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert re.search(r"host=nohost\.invalid was not reachable via ssh", last), last
    assert not (tmp_path / "run").exists()  # nothing was started
