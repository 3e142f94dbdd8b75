"""The demo end to end (tiny profile): training -> signed bundle -> held-out files -> runtime infer -> bench ->
report.html, opened in a real headless browser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from training import config as C


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_heldout_files_read_like_the_training_scans(tmp_path):
    """A phantom written as a file (16-bit PNG or DICOM) and read by the runtime is the scan the model trained on."""
    from runtime.preprocess import load_and_preprocess
    from training.data.datasets import load_synthetic, synthetic_originals
    from training.demo import write_dicom

    p = C.get_profile("tiny")
    data = load_synthetic(40, p.preprocess, seed=3)
    test = data["test"]
    images, labels = synthetic_originals(40, p.preprocess.size, test.groups, seed=3)
    assert np.array_equal(labels, test.labels)
    import cv2

    for i, img in enumerate(images):
        png, dcm = tmp_path / f"{i}.png", tmp_path / f"IM{i}"
        cv2.imwrite(str(png), np.round(img * 65535).astype(np.uint16))
        write_dicom(dcm, img, "yes", i)
        d = np.abs(load_and_preprocess(png, p.preprocess) - test.images[i])
        assert d.max() < 1e-3, png  # 16-bit PNG: the same scan up to rounding
        # DICOM without a window is read min-max stretched: the darkest pixel becomes 0, a shift of well under
        # one 8-bit grey level on average
        d = np.abs(load_and_preprocess(dcm, p.preprocess) - test.images[i])
        assert d.max() < 1 / 64 and d.mean() < 1 / 255, dcm


def test_score_records_on_hand_made_records(tmp_path):
    from training.demo import score_records

    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.png,yes\nIM1,no\nb.png,yes\nIM2,no\n")
    recs = [{"file": "/x/a.png", "prediction": "yes", "refused": False, "flagged": True, "error": None},
            {"file": "/x/IM1", "prediction": "yes", "refused": False, "flagged": False, "error": None},
            {"file": "/x/b.png", "prediction": None, "refused": True, "flagged": False, "error": None},
            {"file": "/x/IM2", "prediction": "no", "refused": False, "flagged": False, "error": None}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = score_records(tmp_path / "r.jsonl", labels)
    assert (s["files"], s["records"], s["diagnosed"], s["refused"], s["flagged"], s["correct"]) == (4, 4, 3, 1, 1, 2)
    assert s["accuracy"] == 0.5  # a refused scan is not a right answer
    assert s["sensitivity"] == 1.0  # of the diagnosed tumors


@pytest.mark.slow
def test_demo_tells_the_story_end_to_end(tiny_demo):
    from runtime import signing
    from runtime.bundle import Bundle, BundleError
    from runtime.torch_engine import TorchEngine

    out = tiny_demo
    bundle = out / "bundle-site-0"
    assert (bundle / "manifest.json").exists() and (bundle / "manifest.sig").exists()
    # the demo's scanner side is ONNX Runtime: no torch programs, and the torch engine says so in one line
    b = Bundle.load(bundle, trusted=[signing.default_signing_key().with_suffix(".pub")])  # the demo's own key
    assert not list(bundle.glob("*.pt2")) and not any(f.endswith(".pt2") for f in b.manifest["files"])
    with pytest.raises(BundleError, match="no classifier.pt2 for the torch engine"):
        TorchEngine(b)
    files = sorted((out / "heldout-scans").iterdir())
    assert any(f.suffix == ".png" for f in files) and any(f.name.startswith("IM") and not f.suffix for f in files)
    recs = [json.loads(line) for line in (out / "runtime-results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in recs) == [f.name for f in files]  # one record per file
    assert all(r["error"] is None and r["bundle_signature"].startswith("verified:") for r in recs)
    acc = json.loads((out / "runtime-accuracy.json").read_text())
    assert acc["files"] == len(files) and acc["diagnosed"] + acc["refused"] == len(files)
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert {c["traffic"] for c in bench["configs"]} == {"clean", "attacked"}
    assert (out / "report.html").exists() and (out / "summary.md").exists()


@pytest.mark.slow
def test_report_renders_in_a_real_browser_with_every_image_and_no_request(tiny_demo, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; `make test` installs it)")
    html = (tiny_demo / "report.html").read_text()
    for needle in ("<h2>Convergence</h2>", "<h2>Sites</h2>", "<h2>Robustness</h2>", "<h2>Purification</h2>",
                   "Latency CDF", "Where the time goes", "held-out files"):
        assert needle in html, needle
    assert "src='http" not in html and 'src="http' not in html and "href=" not in html
    # the page as written, plus a probe that records what the browser loaded into the title
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.title=JSON.stringify({images:im.length,broken:im.filter(i=>!(i.complete&&i.naturalWidth>0)).length,"
             "svgs:document.querySelectorAll('svg').length,"
             "requests:performance.getEntriesByType('resource').map(e=>e.name)})});</script>")
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=http://127.0.0.1:9",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    title = dom.stdout.split("<title>", 1)[1].split("</title>", 1)[0]
    seen = json.loads(title.replace("&quot;", '"'))
    assert seen["images"] >= 12 and seen["broken"] == 0, seen  # the purification grid: 3 rows of images and more
    assert seen["svgs"] >= 3 and seen["requests"] == [], seen  # convergence, latency CDF, stage split; nothing fetched
    shot = tmp_path / "report.png"
    res = subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1100,1800", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    import cv2

    img = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape[1] == 1100 and img.std() > 20  # rendered, not a blank page
