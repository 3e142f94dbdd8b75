"""The component report of a trained run reads the defense's own detection score."""

import json


def test_component_report_uses_the_profiles_detection_score(tiny_run, tmp_path):
    from training import config as C
    from training.report import write_report

    md = write_report(tiny_run, "synth:80", out_dir=tmp_path, progress=False, quick=True, command="test")
    r = json.loads((tmp_path / "report.json").read_text())
    d = r["detector"]
    profile = C.load_toml(tiny_run / "config.toml")
    assert d["score"] == profile.defense.score and d["flag_rate"] == profile.defense.flag_rate
    assert 0.0 <= d["roc_auc_sign_noise"] <= 1.0 and d["n_test"] > 0
    assert r["command"] == "test"
    assert f"Detection score ({profile.defense.score})" in md.read_text()
