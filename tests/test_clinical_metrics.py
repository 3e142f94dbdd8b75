"""Metrics a clinician would trust (PROTOCOL.md rule 8): balanced accuracy, sensitivity, the pooled test set."""

import json
import math

import numpy as np
import pytest
import torch

from training import config as C
from training.data.phantom import CLASS_NAMES
from training.federated import task
from training.metrics import balanced_accuracy, positive_class, sensitivity


def test_balanced_accuracy_on_a_single_class_site():
    labels = np.zeros(10, dtype=int)
    preds = np.array([0] * 8 + [1] * 2)
    # only the class present counts: recall of class 0
    assert balanced_accuracy(labels, preds) == pytest.approx(0.8)
    assert math.isnan(balanced_accuracy([], []))


def test_balanced_accuracy_on_a_mixed_site():
    labels = np.array([0] * 8 + [1] * 2)
    preds = np.zeros(10, dtype=int)  # always the majority class: 80 % accuracy, 50 % balanced
    assert float((preds == labels).mean()) == pytest.approx(0.8)
    assert balanced_accuracy(labels, preds) == pytest.approx(0.5)
    preds = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
    assert balanced_accuracy(labels, preds) == pytest.approx((6 / 8 + 1 / 2) / 2)
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0])


def test_sensitivity():
    labels = np.array([0, 0, 1, 1, 1, 1])
    preds = np.array([1, 0, 1, 1, 0, 1])
    assert sensitivity(labels, preds, 1) == pytest.approx(3 / 4)
    assert sensitivity(labels, preds, 0) == pytest.approx(1 / 2)
    assert math.isnan(sensitivity(np.zeros(5, dtype=int), np.ones(5, dtype=int), 1))  # no positives
    assert math.isnan(sensitivity([], [], 1))


def test_positive_class():
    assert positive_class(["no", "yes"]) == 1
    assert positive_class(list(CLASS_NAMES)) == 1  # the phantoms' names
    assert positive_class(["Tumor", "healthy"]) == 0
    assert positive_class(["normal", "TUMOUR", "other"]) == 1
    assert positive_class(["glioma", "notumor", "pituitary"]) == 2  # no tumor name: the last class


def _site(eval_max: int = 8):
    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2, "partition": "iid", "eval_max": eval_max}})
    return p, task.site_data("synth:64", p, 0, 2), task.build_model("classifier", p).eval()


def test_site_data_carries_the_pooled_splits_in_simulation_only():
    p, data, _ = _site()
    full = task.site_data("synth:64", p, None, None)
    assert full.pooled is None
    assert set(data.pooled) == {"val", "test"}
    for name in ("val", "test"):
        assert len(data.pooled[name]) == len(full[name]) > len(data[name])
        assert np.array_equal(data.pooled[name].labels, full[name].labels)


def test_evaluate_site_reports_clinical_figures_and_the_pooled_test_set():
    p, data, model = _site()
    ev = task.evaluate_site(model, data, p)
    assert set(task.CLINICAL_KEYS) <= set(ev)
    for k in ("pooled_acc", "pooled_balanced_acc", "pooled_sensitivity"):
        assert math.isnan(ev[k])
    for k in ("clean_balanced_acc", "pgd_balanced_acc", "val_acc", "val_balanced_acc", "pooled_val_balanced_acc"):
        assert 0.0 <= ev[k] <= 1.0, k

    ev2 = task.evaluate_site(model, data, p, pooled=True)
    assert set(ev2) == set(ev)
    assert 0.0 <= ev2["pooled_balanced_acc"] <= 1.0 and 0.0 <= ev2["pooled_acc"] <= 1.0
    # the figures of the site's own scans do not change when the pooled ones are computed
    for k in ("clean_acc", "pgd_acc", "clean_balanced_acc", "val_balanced_acc", "pooled_val_balanced_acc"):
        assert ev2[k] == ev[k] or (math.isnan(ev2[k]) and math.isnan(ev[k])), k

    # by hand: the classifier on every pooled test scan (no eval_max cap)
    pt = data.pooled["test"]
    assert len(pt) > p.federated.eval_max
    with torch.no_grad():
        pred = model(torch.as_tensor(pt.images)[:, None].float()).argmax(1).numpy()
    assert ev2["pooled_acc"] == pytest.approx(float((pred == pt.labels).mean()))
    assert ev2["pooled_balanced_acc"] == pytest.approx(balanced_accuracy(pt.labels, pred))
    assert ev2["pooled_sensitivity"] == pytest.approx(sensitivity(pt.labels, pred, positive_class(data.class_names)))


def test_evaluate_site_keys_agree_for_a_site_without_test_scans_and_a_real_site():
    p, data, model = _site()
    ev = task.evaluate_site(model, data, p, pooled=True)
    empty = task.subset(data["test"], np.zeros(0, dtype=int))
    none = task.evaluate_site(model, task.SiteData(1, 2, data.class_names, data.digest, {**data.splits, "test": empty},
                                                   data.pooled), p, pooled=True)
    assert set(none) == set(ev) and none["num-examples"] == 0
    assert math.isnan(none["clean_balanced_acc"]) and 0.0 <= none["pooled_balanced_acc"] <= 1.0
    real = task.evaluate_site(model, task.SiteData(0, 1, data.class_names, data.digest, data.splits), p, pooled=True)
    assert set(real) == set(ev)
    assert math.isnan(real["pooled_val_balanced_acc"]) and math.isnan(real["pooled_balanced_acc"])


def test_evaluate_site_through_the_defense_reports_every_key():
    p, data, model = _site(eval_max=4)
    torch.manual_seed(0)
    det, den = task.build_model("detector", p).eval(), task.build_model("denoiser", p).eval()
    pipe = task.make_defense(model, det, den, p, data["val"])
    ev = task.evaluate_site(model, data, p, pipe, pooled=True)
    assert {"flag_rate_clean", "tau", *task.CLINICAL_KEYS} <= set(ev)
    for k in ("clean_balanced_acc", "val_balanced_acc", "pooled_balanced_acc", "pooled_acc"):
        assert 0.0 <= ev[k] <= 1.0, k


def test_write_summary_reports_clinical_figures_and_phase_time(tmp_path):
    from training.federated.server_app import write_summary

    p = C.resolve("tiny", {"federated": {"method": "fedavg", "sites": 2}})
    base = {"phase": "classifier", "round": p.federated.phase_rounds["classifier"], "kind": "eval", "method": "fedavg"}
    rows = [{**base, "site": 0, "node": 1, "num-examples": 30, "clean_acc": 0.9, "pgd_acc": 0.1,
             "clean_balanced_acc": 0.5, "clean_sensitivity": float("nan"), "pooled_balanced_acc": 0.6,
             "pooled_val_balanced_acc": 0.7, "val_balanced_acc": 0.5},
            {**base, "site": 1, "node": 2, "num-examples": 10, "clean_acc": 0.7, "pgd_acc": 0.2,
             "clean_balanced_acc": 0.7, "clean_sensitivity": 0.8, "pooled_balanced_acc": 0.8,
             "pooled_val_balanced_acc": 0.9, "val_balanced_acc": 0.7}]
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = write_summary(tmp_path, p, 1.0)
    assert "phase_seconds" not in s  # no state.json: tolerated
    assert s["mean_balanced_acc"] == pytest.approx((0.5 * 30 + 0.7 * 10) / 40)
    assert s["mean_sensitivity"] == pytest.approx(0.8)  # a site without positives has none
    assert s["min_site_clean_acc"] == pytest.approx(0.7)
    assert s["mean_pooled_balanced_acc"] == pytest.approx(0.7)  # unweighted: the same scans at every site
    assert s["min_pooled_balanced_acc"] == pytest.approx(0.6)
    assert s["mean_pooled_val_balanced_acc"] == pytest.approx(0.8)
    assert s["per_site"][0]["pooled_balanced_acc"] == 0.6
    md = (tmp_path / "summary.md").read_text()
    assert "| balanced acc | sensitivity | pooled balanced acc |" in md and "Time per phase" not in md

    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "state.json").write_text(json.dumps({"classifier": 2, "phase_seconds": {"classifier": 90.0}}))
    s = write_summary(tmp_path, p, 1.0)
    assert s["phase_seconds"] == {"classifier": 90.0}
    assert json.loads((tmp_path / "summary.json").read_text())["phase_seconds"] == {"classifier": 90.0}
    assert "Time per phase: classifier 1.5 min" in (tmp_path / "summary.md").read_text()


def _report(run, method, sites, mean):
    run.mkdir(parents=True)
    (run / "reports").mkdir()
    kind = f"federated ({method}, {len(sites)} sites)" if method != "centralised" else "centralised"
    (run / "reports" / "robustness.json").write_text(json.dumps({"kind": kind, "sites": sites, "mean": mean}))


def test_paper_tables_write_the_clinician_table(tmp_path):
    from training.evaluate import paper_tables

    sites = [{"site": 0, "n_test": 30, "clean": {"acc": 0.9, "n": 30}},
             {"site": 1, "n_test": 10, "clean": {"acc": 0.6, "n": 10}}]
    mean = {"clean": {"acc": 0.825, "n": 40, "balanced_acc": 0.7, "sensitivity": 0.75},
            "pooled": {"acc": 0.8, "n": 40, "balanced_acc": 0.65, "sites": 2},
            "pgd_linf": {"acc": 0.3, "n": 40, "flag_rate": 0.9}, "pgd_l2": {"acc": 0.4, "n": 40}}
    _report(tmp_path / "mfp", "medfedpure", sites, mean)
    (tmp_path / "mfp" / "summary.json").write_text(json.dumps({"phase_seconds": {"denoiser": 60.0, "classifier": 120.0}}))
    # an older report: no balanced accuracy, no pooled figures, no summary.json
    _report(tmp_path / "avg", "fedavg", sites[:1], {"clean": {"acc": 0.9, "n": 30}, "pgd_linf": {"acc": 0.1, "n": 30}})
    md = paper_tables([tmp_path / "mfp", tmp_path / "avg"], tmp_path / "out")
    tables = json.loads((tmp_path / "out" / "tables.json").read_text())
    assert list(tables) == ["fedavg", "medfedpure"]
    m = tables["medfedpure"]
    assert m["mean_clean"] == 0.825 and m["min_site_clean"] == 0.6 and m["pooled_balanced"] == 0.65
    assert m["mean_sensitivity"] == 0.75 and m["pgd_linf"] == 0.3 and m["pgd_l2"] == 0.4
    assert m["train_minutes"] == pytest.approx(3.0)
    f = tables["fedavg"]
    assert f["min_site_clean"] == 0.9 and f["pooled_balanced"] is None and f["pgd_l2"] is None
    assert f["train_minutes"] is None
    text = md.read_text()
    assert "## Clinician" in text and "| medfedpure |" in text and "Table II" in text
