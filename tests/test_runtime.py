"""The torch-free runtime: bundle verification, parity with the PyTorch defense, `runtime infer`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.bundle import Bundle, BundleError
from runtime.cli import main
from runtime.engines import EngineError, OrtEngine
from runtime.pipeline import Pipeline, PurifyConfig
from tests.scans import training_scan_files


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_verification_refuses_tampering(tiny_bundle, tmp_path):
    Bundle.load(tiny_bundle)  # intact
    b = _copy(tiny_bundle, tmp_path)
    with open(b / "detector.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="detector.onnx: sha256"):
        Bundle.load(b)
    (b / "detector.onnx").unlink()
    with pytest.raises(BundleError, match="detector.onnx: listed in the manifest but missing"):
        Bundle.load(b)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="signature .* does not match the manifest"):
        Bundle.load(b)
    (b / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.load(b, allow_unsigned=True)
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.load(tmp_path / "nowhere")


def test_runtime_purification_matches_training(tiny_bundle):
    from training.diffusion import GaussianDiffusion, purify

    bundle = Bundle.load(tiny_bundle)
    cfg = PurifyConfig.from_manifest(bundle.manifest)
    pipe = Pipeline(OrtEngine(bundle), cfg)
    graph = torch.export.load(str(tiny_bundle / "denoiser.pt2")).module()

    def unet(x_t, t):  # the exported graph takes t as float, as the ONNX one does
        return graph(x_t, t.float())

    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 32, 32)).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    got = pipe.purify(x, 60, rng, noise)
    with torch.no_grad():
        ref = purify(unet, GaussianDiffusion(cfg.num_steps, cfg.beta_start, cfg.beta_end), torch.from_numpy(x), 60,
                     cfg.steps, torch.from_numpy(noise)).numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    d = tmp_path_factory.mktemp("scans")
    return training_scan_files(d, 6)


def test_infer_writes_one_reproducible_line_per_scan(tiny_bundle, scans, tmp_path):
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out1), "--quiet"]) == 0
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out2), "--quiet"]) == 0
    rows = [json.loads(line) for line in out1.read_text().splitlines()]
    again = [json.loads(line) for line in out2.read_text().splitlines()]
    assert len(rows) == 6
    assert [{k: v for k, v in r.items() if k != "ms"} for r in rows] == [{k: v for k, v in r.items() if k != "ms"} for r in again]
    for r in rows:
        assert set(r) >= {"file", "prediction", "probabilities", "score", "flagged", "t_star", "seed", "engine"}
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-4
        assert (r["t_star"] > 0) == r["flagged"]


def test_infer_engines_agree(tiny_bundle, scans, tmp_path):
    res = {}
    for engine in ("ort", "torch"):
        out = tmp_path / f"{engine}.jsonl"
        assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--engine", engine, "--out", str(out), "--quiet"]) == 0
        res[engine] = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(res["ort"], res["torch"]):
        assert a["flagged"] == b["flagged"] and a["prediction"] == b["prediction"]
        assert abs(a["probabilities"]["yes"] - b["probabilities"]["yes"]) < 1e-3


def test_infer_int8_denoiser(tiny_bundle, scans, tmp_path, capsys):
    out32, out8 = tmp_path / "fp32.jsonl", tmp_path / "int8.jsonl"
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out32), "--quiet"]) == 0
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--precision", "int8", "--out", str(out8),
                 "--quiet"]) == 0
    a = [json.loads(line) for line in out32.read_text().splitlines()]
    b = [json.loads(line) for line in out8.read_text().splitlines()]
    assert [r["precision"] for r in b] == ["int8"] * 6
    for r32, r8 in zip(a, b):  # the detector and classifier are the fp32 graphs: same scores, same flags
        assert r32["score"] == pytest.approx(r8["score"], rel=1e-6) and r32["flagged"] == r8["flagged"]
        if not r32["flagged"]:  # nothing purified: the int8 denoiser never ran
            assert r32["probabilities"] == pytest.approx(r8["probabilities"], abs=1e-6)
    # int8 is an ONNX Runtime precision: a clear error elsewhere, no traceback
    capsys.readouterr()
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--engine", "torch", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "Traceback" not in err


def _bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """Every kind of bad input the scanner side must survive -> the words its error must contain."""
    import cv2

    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    png = (good / "no").glob("*.png").__next__().read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "random.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    from tests.test_imageio import _dicom

    _dicom(folder / "nopixels.dcm", None)
    big = np.zeros((10000, 10000), np.uint8)
    cv2.imwrite(str(folder / "huge.png"), big, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return {"empty.png": "empty", "truncated.png": "truncated", "random.jpg": "decode", "random.dcm": "DICOM",
            "nopixels.dcm": "no pixel data", "huge.png": "too large"}


def test_infer_survives_bad_inputs(tiny_bundle, scans, tmp_path, capsys):
    import cv2

    assert main(["infer", str(scans), "--bundle", str(tmp_path / "missing")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    assert main(["infer", str(tmp_path / "nothing-here"), "--bundle", str(tiny_bundle)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty-folder").mkdir()
    assert main(["infer", str(tmp_path / "empty-folder"), "--bundle", str(tiny_bundle)]) == 2
    assert "folder holds no files" in capsys.readouterr().err

    expected = _bad_inputs(tmp_path / "bad", scans)
    # scans that are odd but readable are classified: RGBA and 16-bit
    img = cv2.imread(str(next((scans / "yes").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "bad" / "rgba.png"), cv2.cvtColor(img, cv2.COLOR_GRAY2BGRA))
    cv2.imwrite(str(tmp_path / "bad" / "deep.png"), img.astype(np.uint16) * 257)
    out = tmp_path / "r.jsonl"
    rc = main(["infer", str(scans), str(tmp_path / "bad"), str(tmp_path / "missing.png"), "--bundle", str(tiny_bundle),
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err
    rows = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 6 + len(expected) + 2 + 1
    for name, words in expected.items():
        assert rows[name]["error"] and words in rows[name]["error"], (name, rows[name]["error"])
        assert "\n" not in rows[name]["error"]
    assert "no such file" in rows["missing.png"]["error"]
    for name in ("rgba.png", "deep.png"):
        assert rows[name]["error"] is None and rows[name]["prediction"] in ("no", "yes")
    good = [r for r in rows.values() if r["error"] is None]
    assert len(good) == 8
    for r in good:
        assert len(r["sha256"]) == 64 and set(r["ms"]) == {"preprocess", "ood", "detect", "purify", "classify"}
        steps = Bundle.load(tiny_bundle).manifest["purification"]["steps"]
        assert r["provider"] == "CPUExecutionProvider" and r["purification_steps"] == (steps if r["flagged"] else 0)
        assert r["probability"] == max(r["probabilities"].values())
    # all good: exit 0
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]) == 0


def test_infer_writes_csv(tiny_bundle, scans, tmp_path):
    import csv

    out = tmp_path / "r.csv"
    assert main(["infer", str(scans / "yes" / "*.png"), "--bundle", str(tiny_bundle), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    tumors = sorted((scans / "yes").glob("*.png"))
    assert len(tumors) >= 2 and len(rows) == len(tumors)
    assert {"prob_no", "prob_yes", "ms_detect", "sha256", "error"} <= set(rows[0])
    assert all(abs(float(r["prob_no"]) + float(r["prob_yes"]) - 1) < 1e-4 for r in rows)


def test_info_and_calibrate(tiny_bundle, scans, tmp_path, capsys):
    assert main(["info", "--bundle", str(tiny_bundle)]) == 0
    text = capsys.readouterr().out
    assert "verified" in text and "tau" in text and "classifier.onnx" in text
    new = tmp_path / "site-bundle"
    assert main(["calibrate", "--bundle", str(tiny_bundle), "--clean", str(scans), "--flag-rate", "0.5",
                 "--min-scans", "4", "--out", str(new), "--quiet"]) == 0
    m = Bundle.load(new).manifest  # verifies the copy
    assert m["detector"]["calibration"]["n_scans"] == 6 and m["detector"]["calibration"]["flag_rate"] == 0.5
    assert m["detector"]["calibration"]["previous"]["tau"] == Bundle.load(tiny_bundle).manifest["detector"]["tau"]
    engine = OrtEngine(Bundle.load(new))
    from runtime.imageio import list_images, read_image
    from runtime.preprocess import preprocess

    cfg = Bundle.load(new).preprocess_config
    x = np.stack([preprocess(read_image(f), cfg) for f in list_images(scans)])[:, None]
    assert (engine.score(x) > m["detector"]["tau"]).mean() == pytest.approx(0.5, abs=0.17)
    # refuses: too few scans, same folder, non-empty output
    assert main(["calibrate", "--bundle", str(tiny_bundle), "--clean", str(scans), "--out", str(tmp_path / "x")]) == 2
    assert "at least 20" in capsys.readouterr().err
    assert main(["calibrate", "--bundle", str(tiny_bundle), "--clean", str(scans), "--min-scans", "1",
                 "--out", str(new)]) == 2
    tampered = tmp_path / "t"
    shutil.copytree(new, tampered)
    (tampered / "detector.onnx").write_bytes(b"x")
    assert main(["info", "--bundle", str(tampered)]) == 2
    assert "detector.onnx" in capsys.readouterr().err


def test_cuda_request_fails_when_the_provider_does_not_activate(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the provider may really activate here")
    with pytest.raises(EngineError, match="did not activate the CUDA provider"):
        OrtEngine(Bundle.load(tiny_bundle), device="cuda")


def test_trt_engine_without_tensorrt_says_so(tiny_bundle, scans, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed; the engine is exercised on a GPU machine")
    except ImportError:
        pass
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--engine", "trt", "--quiet"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


@pytest.mark.gpu
def test_trt_engine_matches_ort_on_a_gpu(tiny_bundle, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it comes from NVIDIA)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from runtime.engines import TrtEngine

    b = Bundle.load(_copy(tiny_bundle, tmp_path), verify=True)
    trt_engine, ort_engine = TrtEngine(b, precision="fp32", log=lambda *_: None), OrtEngine(b)
    x = np.random.default_rng(0).random((5, 1, 32, 32)).astype(np.float32)
    assert np.abs(trt_engine.classify(x) - ort_engine.classify(x)).max() < 1e-3
    assert np.allclose(trt_engine.score(x), ort_engine.score(x), rtol=1e-2)


def test_runtime_infer_does_not_import_torch(tiny_bundle, scans):
    code = ("import sys; from runtime.cli import main; rc = main(sys.argv[1:]); "
            "sys.exit(rc or ('torch' in sys.modules) * 3)")
    r = subprocess.run([sys.executable, "-c", code, "infer", str(scans), "--bundle", str(tiny_bundle), "--quiet",
                        "--out", str(Path(scans).parent / "nt.jsonl")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
