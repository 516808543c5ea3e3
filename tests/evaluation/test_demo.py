"""The main job, ``unsc-fast demo``, end to end on a shortened schedule, and its CLI errors."""
import subprocess
import sys

import pytest
import torch

from unsc_fast.evaluation.cli import main
from unsc_fast.evaluation.demo import DemoRow, format_table, run_demo


@pytest.fixture(scope="module")
def demo_rows():
    return run_demo(forget_class=5, train_epochs=8, unlearn_epochs=5)


def test_demo_rows_tell_the_story(demo_rows):
    by_method = {row.method: row for row in demo_rows}
    assert list(by_method) == ["original", "retrain (gold standard)", "UNSC", "random labels, forget data only"]
    original, retrained, unsc, random = (by_method[name] for name in by_method)
    assert original.forget_test > 80 and retrained.forget_test == 0.0
    assert unsc.forget_test < 10 and unsc.forget_train < 5
    assert unsc.remain_test >= original.remain_test - 2.0
    # without projection or calibration the remaining classes are damaged far more
    assert random.remain_test < unsc.remain_test - 10
    assert all(row.seconds > 0 for row in demo_rows)


def test_table_has_a_row_per_method(demo_rows):
    table = format_table(demo_rows).splitlines()
    assert table[0].startswith("| method | Acc_r test %")
    assert len(table) == 2 + len(demo_rows)
    assert format_table([DemoRow("x", 1, 2, 3, 4, 5, 6)]).splitlines()[-1] == "| x | 1.00 | 2.00 | 3.00 | 4.00 | 5.0 | 6.00 |"


def test_cli_prints_the_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--forget-class", "1", "--train-epochs", "2", "--epochs", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1  # the demo's default
    finally:
        torch.set_num_threads(threads)  # the rest of the suite runs as before
    out = capsys.readouterr().out
    assert "Forgetting digit 1" in out and "| UNSC |" in out


def test_cli_rejects_a_class_that_is_not_a_digit():
    with pytest.raises(ValueError, match="forget_class must be a digit"):
        main(["demo", "--forget-class", "12", "--quiet", "--threads", str(torch.get_num_threads())])


def test_module_entry_point_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "unsc_fast", "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out and "compare" in out
