"""The scanner side as a trust boundary: signed manifests, paths inside the bundle, per-scan noise, refusals, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import signing
from runtime.bundle import Bundle, BundleError
from runtime.cli import main


def _copy(bundle: Path, tmp_path: Path, name: str = "b") -> Path:
    dst = tmp_path / name
    shutil.copytree(bundle, dst)
    return dst


def _edit(b: Path, fn, resign: bool = True) -> None:
    """Change the manifest with ``fn`` and (``resign``) sign it again with the trusted export key."""
    m = json.loads((b / "manifest.json").read_text())
    m = fn(m) or m
    (b / "manifest.json").write_text(json.dumps(m))
    if resign:
        signing.sign_manifest(b, signing.default_signing_key(), signer="test", role="export")


def _scans(tmp_path: Path, n: int = 6) -> Path:
    from tests.scans import training_scan_files

    return training_scan_files(tmp_path / "scans", n)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# 1. the manifest is covered by the signature; its values are checked


def test_a_tampered_manifest_is_refused(tiny_bundle, tmp_path, capsys):
    assert Bundle.load(tiny_bundle).signature.status == "verified"
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, lambda m: m.update(class_names=m["class_names"][::-1]), resign=False)  # swap the classes
    with pytest.raises(BundleError, match="does not match the manifest"):
        Bundle.load(b)
    assert main(["info", "--bundle", str(b)]) == 2
    err = capsys.readouterr().err
    assert "does not match the manifest" in err and "Traceback" not in err
    # --allow-unsigned does not excuse a broken signature
    with pytest.raises(BundleError, match="does not match"):
        Bundle.load(b, allow_unsigned=True)


@pytest.mark.parametrize("tau", [1e9, float("nan"), -1.0, float("inf")])
def test_values_no_trained_bundle_has_are_refused_even_when_signed(tiny_bundle, tmp_path, tau):
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, lambda m: m["detector"].update(tau=tau))
    with pytest.raises(BundleError, match="tau"):
        Bundle.load(b)


def test_class_names_must_fit_the_classifier(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, lambda m: m.update(class_names=["no", "yes", "maybe"]))
    from runtime.engines import EngineError, OrtEngine

    with pytest.raises(EngineError, match="3 classes"):
        OrtEngine(Bundle.load(b))
    b2 = _copy(tiny_bundle, tmp_path, "b2")
    _edit(b2, lambda m: m.update(class_names=["yes", "yes"]))
    with pytest.raises(BundleError, match="distinct"):
        Bundle.load(b2)


def test_unsigned_and_untrusted_bundles_need_an_explicit_choice(tiny_bundle, tmp_path, capsys):
    scans = _scans(tmp_path, 2)
    b = _copy(tiny_bundle, tmp_path)
    (b / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="unsigned"):
        Bundle.load(b)
    out = tmp_path / "r.jsonl"
    assert main(["infer", str(scans), "--bundle", str(b), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()
    assert main(["infer", str(scans), "--bundle", str(b), "--out", str(out), "--quiet", "--allow-unsigned"]) == 0
    recs = _records(out)
    assert len(recs) == 2 and all(r["bundle_signature"] == "unverified:unsigned" for r in recs)
    assert "NOT VERIFIED" in capsys.readouterr().err

    # signed by a key this machine does not trust
    key, pub = signing.generate_key(tmp_path / "other" / "k.key")
    signing.sign_manifest(b, key, signer="someone else", role="export")
    with pytest.raises(BundleError, match="does not trust"):
        Bundle.load(b)
    loaded = Bundle.load(b, trusted=[pub])
    assert loaded.signature.status == "verified" and loaded.signature.signer == "someone else"
    assert main(["info", "--bundle", str(b), "--trusted-key", str(pub)]) == 0
    assert "signed by 'someone else'" in capsys.readouterr().out


def test_calibrate_resigns_with_the_site_key_and_records_the_previous_tau(tiny_bundle, tmp_path, capsys):
    scans = _scans(tmp_path, 24)
    key, pub = signing.generate_key(tmp_path / "site" / "site.key")
    new = tmp_path / "calibrated"
    assert main(["calibrate", "--bundle", str(tiny_bundle), "--clean", str(scans), "--out", str(new),
                 "--signing-key", str(key), "--quiet"]) == 0
    with pytest.raises(BundleError, match="does not trust"):  # signed by the site, not the export
        Bundle.load(new)
    b = Bundle.load(new, trusted=[pub])
    prev = b.manifest["detector"]["calibration"]["previous"]
    assert prev["tau"] == Bundle.load(tiny_bundle).manifest["detector"]["tau"]
    assert prev["signed_by"] == Bundle.load(tiny_bundle).signature.key_id
    assert b.signature.role == "site calibration"
    capsys.readouterr()
    assert main(["info", "--bundle", str(new), "--trusted-key", str(pub)]) == 0
    assert "recalibrated from tau" in capsys.readouterr().out


# 2. paths: every file the manifest names is a plain file inside the bundle


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/hostname", "sub/../../secret.txt", "..", ".hidden"])
def test_a_manifest_cannot_name_a_file_outside_the_bundle(tiny_bundle, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the runtime")
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, lambda m: m["files"].update({name: {"sha256": signing.hashlib.sha256(b"x").hexdigest(), "bytes": 1}}))
    with pytest.raises(BundleError, match="not a plain name inside the bundle"):
        Bundle.load(b)
    # calibrate, which copies every listed file, writes nothing outside --out
    out = tmp_path / "cal" / "new"
    out.parent.mkdir()
    assert main(["calibrate", "--bundle", str(b), "--clean", str(tmp_path), "--out", str(out), "--quiet"]) == 2
    assert sorted(p.name for p in (tmp_path / "cal").iterdir()) == []


def test_a_symlink_in_place_of_a_model_file_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle, tmp_path)
    real = tmp_path / "elsewhere.onnx"
    shutil.move(b / "classifier.onnx", real)
    os.symlink(real.resolve(), b / "classifier.onnx")  # same bytes, same sha256, but outside the bundle
    with pytest.raises(BundleError, match="symlink"):
        Bundle.load(b)


# 6. the same scan gets the same answer in any batch


def _flag_everything(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy that purifies every scan (so purification noise matters), signed by the trusted key."""
    b = _copy(tiny_bundle, tmp_path, "flag-all")
    _edit(b, lambda m: m["purification"].update(mode="always"))
    return b


def test_a_scans_result_does_not_depend_on_its_batch(tiny_bundle, tmp_path):
    scans = _scans(tmp_path, 6)
    b = _flag_everything(tiny_bundle, tmp_path)
    runs = {}
    for bs in (1, 4, 8):
        out = tmp_path / f"bs{bs}.jsonl"
        assert main(["infer", str(scans), "--bundle", str(b), "--batch-size", str(bs), "--out", str(out), "--quiet"]) == 0
        runs[bs] = {r["file"]: r for r in _records(out)}
    first = runs[1]
    assert all(r["flagged"] for r in first.values())
    for bs in (4, 8):
        for f, r in runs[bs].items():
            assert r["seed"] == first[f]["seed"]
            for c, p in r["probabilities"].items():
                assert abs(p - first[f]["probabilities"][c]) < 1e-5, (bs, f)
    # the recorded seed reproduces the result of one scan on its own
    f, r = next(iter(first.items()))
    out = tmp_path / "again.jsonl"
    assert main(["infer", f, "--bundle", str(b), "--seed", str(r["seed"]), "--out", str(out), "--quiet"]) == 0
    again = _records(out)[0]
    assert all(abs(again["probabilities"][c] - p) < 1e-5 for c, p in r["probabilities"].items())
    # another site's secret draws other noise
    other = tmp_path / "other.secret"
    other.write_bytes(os.urandom(32))
    out = tmp_path / "other.jsonl"
    assert main(["infer", f, "--bundle", str(b), "--secret", str(other), "--out", str(out), "--quiet"]) == 0
    assert _records(out)[0]["seed"] != r["seed"]
    secret = Path(str(b) + ".secret")
    assert secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
    assert secret.read_bytes().hex() not in (tmp_path / "bs1.jsonl").read_text()


# 5. what is not a brain MRI gets no diagnosis


def test_out_of_distribution_inputs_are_refused(tiny_bundle, tmp_path):
    """A blank frame and a strip are refused before any model runs; noise by the out-of-distribution score.

    (The tiny one-epoch model's features cannot tell text from its phantoms; on Br35H the score's ROC AUC per
    kind, text included, is measured by ``benchmarks/ood.py``.)
    """
    d = tmp_path / "ood"
    d.mkdir()
    cv2.imwrite(str(d / "white.png"), np.full((128, 128), 255, np.uint8))
    cv2.imwrite(str(d / "strip.png"), np.random.default_rng(0).integers(0, 256, (2, 3000)).astype(np.uint8))
    cv2.imwrite(str(d / "noise.png"), np.random.default_rng(1).integers(0, 256, (128, 128)).astype(np.uint8))
    out = tmp_path / "r.jsonl"
    assert main(["infer", str(d), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]) == 0
    recs = {Path(r["file"]).name: r for r in _records(out)}
    assert set(recs) == {"white.png", "strip.png", "noise.png"}
    for r in recs.values():
        assert r["refused"] is True and r["prediction"] is None and r["probabilities"] is None and r["error"] is None
    assert "blank image" in recs["white.png"]["refusal"] and recs["white.png"]["ood_score"] is None
    assert "no head-shaped region" in recs["strip.png"]["refusal"]
    threshold = Bundle.load(tiny_bundle).ood_threshold
    assert recs["noise.png"]["ood_score"] > threshold and "out-of-distribution" in recs["noise.png"]["refusal"]
    # and clean scans like the training scans are diagnosed
    scans = _scans(tmp_path, 6)
    out = tmp_path / "clean.jsonl"
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]) == 0
    clean = _records(out)
    assert sum(r["refused"] for r in clean) <= 1 and all(r["prediction"] for r in clean if not r["refused"])


# 7. one-line errors, never a traceback


@pytest.mark.parametrize("manifest", ["[1, 2, 3]", '{"schema_version": 2, "files": null}', "null", '"text"'])
def test_malformed_manifests_are_one_line_errors(tiny_bundle, tmp_path, capsys, manifest):
    b = _copy(tiny_bundle, tmp_path)
    (b / "manifest.json").write_text(manifest)
    signing.sign_manifest(b, signing.default_signing_key(), signer="test", role="export")
    assert main(["info", "--bundle", str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_an_entry_without_sha256_is_a_one_line_error(tiny_bundle, tmp_path, capsys):
    b = _copy(tiny_bundle, tmp_path)
    def drop(m):
        del m["files"]["classifier.onnx"]["sha256"]

    _edit(b, drop)
    assert main(["info", "--bundle", str(b)]) == 2
    err = capsys.readouterr().err
    assert "classifier.onnx" in err and "sha256" in err and err.count("\n") == 1


def test_unwritable_outputs_are_one_line_errors(tiny_bundle, tmp_path, capsys):
    scans = _scans(tmp_path, 2)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (tmp_path, tmp_path / "missing" / "r.jsonl", blocker / "r.jsonl"):
        assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and err.count("\n") == 1
    assert main(["preprocess", str(scans), "--out", str(blocker)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tiny_bundle):
    code = "import sys; from runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    p1 = subprocess.Popen([sys.executable, "-c", code, "info", "--bundle", str(tiny_bundle)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    p1.stdout.close()  # the reader is gone before the first line is written, like `runtime info | true`
    err = p1.stderr.read().decode()
    assert p1.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_averaging_draws_is_the_mean_of_single_draws(tiny_bundle, tmp_path):
    from runtime.engines import OrtEngine
    from runtime.pipeline import Pipeline, PurifyConfig, scan_seed

    b = Bundle.load(_flag_everything(tiny_bundle, tmp_path))
    pipe = Pipeline(OrtEngine(b), PurifyConfig.from_manifest(b.manifest), b.ood_threshold)
    x = np.random.default_rng(0).random((3, 1, b.size, b.size)).astype(np.float32)
    seeds = np.array([[scan_seed(b"k" * 32, f"{i:064x}", d) for d in range(3)] for i in range(3)], np.int64)
    singles = [pipe.run(x, seed=seeds[:, d])["probs"] for d in range(3)]
    assert not np.allclose(singles[0], singles[1], atol=1e-6)  # the noise matters here
    mixed = pipe.run(x, seed=seeds)
    assert mixed["flagged"].all()
    np.testing.assert_allclose(mixed["probs"], np.mean(singles, 0), atol=1e-5)


def test_extensionless_dicom_in_a_folder_is_read_and_every_file_gets_a_record(tiny_bundle, tmp_path):
    from tests.test_imageio import _dicom

    scans = _scans(tmp_path, 2)
    pacs = tmp_path / "pacs"
    (pacs / "series1").mkdir(parents=True)
    png = sorted(scans.rglob("*.png"))[0]
    pixels = (cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    _dicom(pacs / "series1" / "IM0001", pixels)
    _dicom(pacs / "series1" / "1.2.840.113619.2.55.3.604688119", pixels)
    (pacs / "README.txt").write_text("export notes")
    os.symlink(pacs / "loop-b", pacs / "loop-a")
    os.symlink(pacs / "loop-a", pacs / "loop-b")
    out = tmp_path / "r.jsonl"
    rc = main(["infer", str(pacs), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"])
    recs = {Path(r["file"]).name: r for r in _records(out)}
    assert set(recs) == {"IM0001", "1.2.840.113619.2.55.3.604688119", "README.txt", "loop-a", "loop-b"}
    for name in ("IM0001", "1.2.840.113619.2.55.3.604688119"):
        assert recs[name]["error"] is None and len(recs[name]["sha256"]) == 64
    assert recs["README.txt"]["skipped"] is True and "not an image" in recs["README.txt"]["error"]
    assert all("symlink loop" in recs[n]["error"] for n in ("loop-a", "loop-b"))
    assert rc == 3  # the symlink loops are failures; the README is only skipped
