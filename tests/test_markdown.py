"""The reports' markdown tables."""

import subprocess
import sys

import pytest

from runtime.markdown import table


def test_default_alignment_left_then_right_and_cells_through_str():
    assert table(["run", "scans", "accuracy"], [["a", 12, 0.5], ("b", None, "98.00 %")]) == [
        "| run | scans | accuracy |",
        "|---|---:|---:|",
        "| a | 12 | 0.5 |",
        "| b | None | 98.00 % |",
    ]


def test_explicit_alignment_and_empty_cells():
    assert table(("site", "method", "acc", "note"), [(3, "fedavg", 1.25, "")], align="rllr") == [
        "| site | method | acc | note |",
        "|---:|---|---|---:|",
        "| 3 | fedavg | 1.25 |  |",
    ]


def test_no_rows_and_rows_from_a_generator():
    assert table(["k"], []) == ["| k |", "|---|"]
    assert table(["k", "v"], ((k, 2 * k) for k in range(2)), align="rr") == ["| k | v |", "|---:|---:|",
                                                                             "| 0 | 0 |", "| 1 | 2 |"]


@pytest.mark.parametrize("align", ["l", "lrr", "lx"])
def test_alignment_must_name_each_column_l_or_r(align):
    with pytest.raises(ValueError):
        table(["a", "b"], [], align=align)


def test_imports_only_the_standard_library():
    code = ("import sys; import runtime.markdown; "
            "print(sorted(m for m in ('numpy', 'torch', 'onnxruntime', 'training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
