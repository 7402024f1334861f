"""The README stays true (its configuration reference and its two set-up commands), and every
command explains itself."""

import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_dist.config import readme_with_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_config_reference_in_readme_is_current():
    text = README.read_text()
    assert readme_with_reference(text) == text, "stale: run `python -m alexnet_dist.config README.md`"


def test_readme_opens_with_the_two_setup_commands():
    block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].endswith('pip install -e ".[test]" && deepspeed --num_gpus 2 train.py')
    assert block[1].endswith("python -m pytest -q")


@pytest.mark.parametrize("command, names", [
    (["train.py", "--help"], ["--config FILE", "default: configs/default.yaml", "python -m alexnet_dist.config"]),
    (["-m", "alexnet_dist.bench", "--help"], ["data", "model", "train", "MODE --help"]),
    (["-m", "alexnet_dist.bench", "model", "--help"], ["--ranks", "(default: 2)", "--json OUT", "(default: none)"]),
    (["-m", "alexnet_dist.config", "--help"], ["README.md", "config-reference markers"]),
    (["-m", "alexnet_dist.export", "--help"], ["RUN_DIR", "OUT.pt", "AlexNet.load"]),
    (["-m", "alexnet_dist.viz", "--help"], ["--out OUT", "filters.png"]),
    (["-m", "data_pipeline.pca", "--help"], ["--images IMAGES", "(default: 2000)"]),
    (["-m", "data_pipeline.downsample", "--help"], ["--size SIZE", "(default: 256)"]),
    (["-m", "data_pipeline.pack", "--help"], ["SRC", "DST", "--shards N", "(default: one per 512 MiB", "--resize SIDE",
                                              "--workers K", "--on-bad-file {error,skip}", "(default: error)"]),
])
def test_every_help_names_its_arguments_and_defaults(command, names):
    done = subprocess.run([sys.executable, *command], cwd=README.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "``" not in done.stdout, done.stdout + done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines at the terminal's width
    assert all(" ".join(n.split()) in text for n in names), done.stdout


def test_the_config_tool_refuses_a_file_without_the_markers_in_one_line(tmp_path, capsys):
    from alexnet_dist.config import main

    other = tmp_path / "notes.md"
    other.write_text("no markers here\n")
    assert main([str(other)]) == 2 and other.read_text() == "no markers here\n"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no <!-- config-reference:start -->" in err
