"""The runtime-vs-PyTorch agreement benchmark runs on the tiny bundle and agrees with itself."""

import json

import pytest


@pytest.mark.slow
def test_agreement_on_the_tiny_bundle(tiny_run, tiny_bundle, tmp_path):
    from benchmarks.agreement import main

    assert main(["--run", str(tiny_run), "--bundle", str(tiny_bundle), "--max-scans", "8", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "agreement.json").read_text())
    assert set(r["threats"]) == {"clean", "pgd_linf"} and r["scans"] == 8
    assert abs(r["tau"]["runtime"] - r["tau"]["torch"]) <= 1e-6 * max(1.0, abs(r["tau"]["torch"]))
    for row in r["threats"].values():
        assert row["flag_agreement"] == 1.0 and row["t_star_agreement"] == 1.0
        assert row["prediction_agreement"] == 1.0 and row["probs_max_abs_diff"] < 1e-3
    assert "| clean |" in (tmp_path / "agreement.md").read_text()
    assert main(["--run", str(tmp_path / "nope"), "--bundle", str(tiny_bundle), "--out", str(tmp_path)]) == 2
