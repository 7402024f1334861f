"""The README stays true: its configuration reference and its two set-up commands."""

from pathlib import Path

from alexnet_dist.config import readme_with_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_config_reference_in_readme_is_current():
    text = README.read_text()
    assert readme_with_reference(text) == text, "stale: run `python -m alexnet_dist.config README.md`"


def test_readme_opens_with_the_two_setup_commands():
    block = README.read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].endswith('pip install -e ".[test]" && deepspeed --num_gpus 2 train.py')
    assert block[1].endswith("python -m pytest -q")
