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
from training.data.phantom import write_dataset


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
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.load(b)
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
    write_dataset(d, 6, size=64, seed=3, progress=False)
    return d


def test_infer_writes_one_reproducible_line_per_scan(tiny_bundle, scans, tmp_path):
    out1, out2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out1), "--quiet"]) == 0
    assert main(["infer", str(scans), "--bundle", str(tiny_bundle), "--out", str(out2), "--quiet"]) == 0
    rows = [json.loads(line) for line in out1.read_text().splitlines()]
    assert len(rows) == 6 and out1.read_text() == out2.read_text()
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


def test_infer_errors_are_clear(tiny_bundle, scans, tmp_path, capsys):
    assert main(["infer", str(scans), "--bundle", str(tmp_path / "missing")]) == 2
    assert "no such bundle" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(scans, bad)
    (bad / "no" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    assert main(["infer", str(bad), "--bundle", str(tiny_bundle), "--quiet"]) == 2
    assert "broken.png" in capsys.readouterr().err
    out = tmp_path / "r.jsonl"
    assert main(["infer", str(bad), "--bundle", str(tiny_bundle), "--skip-bad", "--out", str(out), "--quiet"]) == 0
    assert sum("error" in json.loads(line) for line in out.read_text().splitlines()) == 1


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
