"""metrics.jsonl: one reader for the trainer and the pictures, tolerant of a cut-off last line."""

import pytest

from alexnet_dist.metrics import MetricsLog, read_records

GOOD = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.4}\n'


def test_an_unterminated_last_line_is_left_out_by_the_reader_and_repaired_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(GOOD + '{"step": 4, "lo')  # what a full disk or a live writer leaves
    assert [r["step"] for _, r in read_records(path)] == [1, 2, 3]
    MetricsLog(tmp_path).truncate_after(2)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    assert "dropped 1 damaged line(s) (line 4)" in capsys.readouterr().out


def test_a_damaged_complete_line_is_named_by_the_reader_and_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n{"step": 3, "loss": 0.4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        read_records(path)
    MetricsLog(tmp_path).truncate_after(3)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 3, "loss": 0.4}\n'
    assert "line 2" in capsys.readouterr().out
