"""Export: the graphs equal the training code, the bundle is complete, verified and within parity."""

import json

import numpy as np
import onnx
import pytest
import torch

from export.graphs import DetectorGraph
from training import config as C
from training.models import create_model
from training.models.mae import complementary_masks


def test_detector_graph_equals_the_training_score():
    p = C.get_profile("tiny")
    torch.manual_seed(0)
    mae = create_model("detector", p).eval()
    x = torch.rand(3, 1, 32, 32)
    masks, resp = complementary_masks(mae.num_patches, p.detector.mask_ratio, p.detector.mask_seed)
    with torch.no_grad():
        ref = mae.score(x, masks, resp)
        got = DetectorGraph(mae, p.detector.mask_ratio, p.detector.mask_seed)(x)
    assert torch.allclose(ref, got, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_bundle_is_complete_and_in_parity(tiny_run, tmp_path):
    import onnxruntime as ort

    from export.bundle import SCHEMA_VERSION, export_site, sha256

    out = tmp_path / "bundle"
    m = export_site(tiny_run, 0, out, log=lambda *_: None)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION == m["schema_version"]
    names = {"classifier", "detector", "denoiser"}
    assert set(saved["files"]) == ({f"{n}.onnx" for n in names} | {f"{n}.fp16.onnx" for n in names}
                                   | {f"{n}.pt2" for n in names})
    for f, meta in saved["files"].items():
        assert sha256(out / f) == meta["sha256"]
        if not f.endswith(".onnx"):
            continue
        model = onnx.load(str(out / f))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(onnx.load(str(out / "classifier.onnx")), full_check=True)
    assert saved["parity"]["passed"] and saved["parity"]["fp32"]["probs_max_abs"] <= 1e-4
    assert saved["detector"]["tau"] > 0 and saved["detector"]["calibration"]["flag_rate"] == 0.05
    assert saved["provenance"]["split_digest"] and saved["class_names"] == ["no", "yes"]
    # the noise-floor score is computed in fp32 in both variants (fp16 cannot resolve it)
    assert saved["detector"]["score_kind"] == "floor"
    assert (out / "detector.fp16.onnx").read_bytes() == (out / "detector.onnx").read_bytes()
    # dynamic batch: 1 and 5 scans through the same session
    s = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        probs = s.run(None, {"image": np.random.rand(n, 1, 32, 32).astype(np.float32)})[0]
        assert probs.shape == (n, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_export_refuses_bad_requests(tiny_run, tmp_path):
    from export.bundle import export_site

    with pytest.raises(ValueError, match="no site 3"):
        export_site(tiny_run, 3, tmp_path / "b", log=lambda *_: None)
    with pytest.raises(ValueError, match="opset"):
        export_site(tiny_run, 0, tmp_path / "b", opset=13, log=lambda *_: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_site(tiny_run, 0, tmp_path / "full", log=lambda *_: None)


def test_noise_floor_graph_exports_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    from export.graphs import detector_graph, score_description
    from training.defense import noise_floor

    p = C.get_profile("tiny")
    assert p.defense.score == "floor" and "Laplacian" in score_description(p)
    graph = detector_graph(None, p).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.onnx.export(graph, (x,), tmp_path / "d.onnx", input_names=["image"], output_names=["score"],
                      dynamic_axes={"image": {0: "batch"}, "score": {0: "batch"}}, opset_version=17, dynamo=False)
    onnx.checker.check_model(str(tmp_path / "d.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    y = torch.rand(5, 1, 32, 32)
    y[:2, :, :10] = 0.0  # flat regions: many zero Laplacian values
    got = sess.run(None, {"image": y.numpy()})[0]
    assert np.allclose(got, noise_floor(y, p.defense.floor_fraction).numpy(), rtol=1e-5, atol=1e-8)
