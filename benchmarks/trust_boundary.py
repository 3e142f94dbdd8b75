"""The scanner side's trust boundary: what ``runtime`` does with tampered bundles, hostile inputs and bad output paths.

``python -m benchmarks.trust_boundary --code ROOT --label before|after --out DIR``
``python -m benchmarks.trust_boundary --merge DIR``  (DIR/before and DIR/after -> DIR/README.md)

Every step runs in a child process with ``cwd=ROOT`` and ``PYTHONPATH=ROOT``,
so ROOT's ``training``, ``export`` and ``runtime`` are the code under test:
a tiny run is trained and its site 0 exported (as ``tests/conftest.py`` does,
with ``MEDFEDPURE_HOME`` in a scratch folder whose export key is trusted),
then each case runs ``runtime.cli.main`` on a tampered copy of the bundle or a
hostile input. Per run: exit code, first line of stderr, whether stderr holds a
Python traceback, what the records say, and the child's peak resident memory
(``VmHWM``, read at exit; the child runs under ``RLIMIT_AS`` of 4 GB, so a
decompression bomb fails with an error instead of taking the machine down).

Where ROOT has ``runtime/signing.py``, a tampered manifest is also re-signed
with the trusted export key, to reach the check behind the signature.

The decompression bombs and the DICOM writer are the ones in this
repository's ``tests/test_input_limits.py`` and ``tests/test_imageio.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime.markdown import table

HERE = Path(__file__).resolve().parents[1]
AS_LIMIT = 4 << 30
TIMEOUT_S = 600

SETUP = r"""
import json, sys
from pathlib import Path

import torch

torch.set_num_threads(1)
from training import config as C
from training.data.datasets import load_dataset
from training.train import train_component
from export.bundle import export_site
from training.data.phantom import write_dataset

work = Path(sys.argv[1])
p = C.get_profile("tiny")
data = load_dataset("synth:80", p.preprocess)
run = work / "run"
run.mkdir()
(run / "config.toml").write_text(C.dump_toml(p))
(run / "data.txt").write_text(f"source = synth:80\nsplit_digest = {data.digest}\n")
for comp in C.COMPONENTS:
    train_component(comp, p, data, run, epochs=1, progress=False, log=lambda *_: None)
export_site(run, 0, work / "bundle", log=lambda *_: None)
write_dataset(work / "scans", 6, size=64, seed=3, progress=False)
(work / "scans" / "phantoms.csv").unlink()
try:
    from runtime.pipeline import load_site_secret
except ImportError:
    pass
else:
    load_site_secret(work / "site.secret")
import export, runtime, training
print(json.dumps({m.__name__: str(Path(m.__file__).parent) for m in (training, export, runtime)}))
"""

RESIGN = r"""
import sys
from runtime.signing import sign_manifest

for b in sys.argv[2:]:
    sign_manifest(b, sys.argv[1], signer="export key, re-signed after the edit", role="export")
"""

CHILD = r"""
import atexit, os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

def _peak():
    try:
        kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        os.write(2, ("\n@@VmHWM_kB " + str(kb) + "\n").encode())
    except Exception:
        pass

atexit.register(_peak)
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
""".replace("AS_LIMIT", str(AS_LIMIT))


def _load_test_module(name: str):
    """A module of this repository's tests/ by file path (its ``tests.x`` imports resolve against HERE)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    mod_name = f"tests.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, HERE / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


class Bench:
    def __init__(self, root: Path, work: Path, python: str):
        self.root, self.work, self.python = root, work, python
        self.home = work / "home"
        self.signing = (root / "runtime" / "signing.py").exists()
        cli = (root / "runtime" / "cli.py").read_text()
        self.has_secret = '"--secret"' in cli
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDFEDPURE_HOME")}
        self.env |= {"PYTHONPATH": str(root), "MEDFEDPURE_HOME": str(self.home), "OMP_NUM_THREADS": "1",
                     "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MEDFEDPURE_NO_CACHE": "1",
                     "PYTHONDONTWRITEBYTECODE": "1"}

    # -- text ------------------------------------------------------------------------------------------------
    def short(self, s: str) -> str:
        return (s.replace(str(self.work), "$W").replace(str(self.root), "$ROOT")
                .replace(str(self.work.resolve()), "$W"))

    # -- children --------------------------------------------------------------------------------------------
    def py(self, code: str, *args: str, timeout: int = 3600) -> str:
        proc = subprocess.run([self.python, "-c", code, *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def cli(self, args: list[str], *, close_stdout: bool = False) -> dict:
        argv = [self.python, "-c", CHILD, *args]
        t0 = time.perf_counter()
        if close_stdout:
            proc = subprocess.Popen(argv, cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            proc.stdout.close()  # the reader is gone before the child writes anything
            err = proc.stderr.read()
            proc.stderr.close()
            rc = proc.wait(timeout=TIMEOUT_S)
            out = b""
        else:
            proc = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, stdin=subprocess.DEVNULL,
                                  timeout=TIMEOUT_S)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        wall = time.perf_counter() - t0
        out_s = out.decode("utf-8", "replace")
        err_lines, peak_kb = [], None
        for line in err.decode("utf-8", "replace").splitlines():
            if line.startswith("@@VmHWM_kB "):
                peak_kb = int(line.split()[1])
            else:
                err_lines.append(line)
        while err_lines and not err_lines[-1].strip():
            err_lines.pop()
        stderr = "\n".join(err_lines)
        first = next((ln.strip() for ln in err_lines if ln.strip()), "")
        traceback = "Traceback (most recent call last)" in stderr
        exc = None
        if traceback:
            tail = err_lines[max(i for i, ln in enumerate(err_lines) if ln.startswith("Traceback")) + 1:]
            exc = next((ln for ln in reversed(tail) if ln and not ln[0].isspace()), None)
        error = next((ln.strip() for ln in err_lines if ln.startswith("error:")), None)
        records = []
        for line in out_s.splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "file" in r:
                records.append(r)
        return {"argv": ["runtime", *[self.short(a) for a in args]], "exit": rc,
                "signal": -rc if rc < 0 else None, "stderr_first": self.short(first)[:120], "traceback": traceback,
                "exception": self.short(exc)[:200] if exc else None,
                "error": self.short(error)[:300] if error else None,
                "stderr_tail": [self.short(x)[:200] for x in err_lines[-4:]],
                "peak_mb": round(peak_kb / 1024, 1) if peak_kb is not None else None,
                "wall_s": round(wall, 2), "records": [self.record(r) for r in records],
                "stdout_lines": len(out_s.splitlines()),
                "stdout_head": [self.short(x)[:200] for x in out_s.splitlines()[:20]] if not records else []}

    def record(self, r: dict) -> dict:
        keep = ("prediction", "probability", "probabilities", "refused", "refusal", "flagged", "score", "ood_score",
                "seed", "skipped", "error", "bundle_signature")
        out = {"file": self.short(str(r.get("file")))}
        out |= {k: (self.short(r[k]) if isinstance(r[k], str) else r[k]) for k in keep if k in r}
        return out

    # -- bundles ---------------------------------------------------------------------------------------------
    def copy(self, name: str, edit=None) -> Path:
        dst = self.work / "bundles" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.work / "bundle", dst, symlinks=True)
        if edit is not None:
            m = json.loads((dst / "manifest.json").read_text())
            m = edit(m, dst)
            (dst / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m, indent=1))
        return dst

    def infer(self, *inputs: str | Path, bundle: Path, extra: list[str] = ()) -> list[str]:
        args = ["infer", *map(str, inputs), "--bundle", str(bundle), "--threads", "1", "--quiet"]
        if self.has_secret:
            args += ["--secret", str(self.work / "site.secret")]
        return args + list(extra)


# -- phrases ---------------------------------------------------------------------------------------------------

def _cut(s: str, n: int = 110) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _rec(r: dict) -> str:
    if r.get("skipped"):
        return f"skipped ({_cut(r.get('error'), 60)})"
    if r.get("error"):
        return f"error: {_cut(r['error'], 90)}"
    if r.get("refused"):
        return f"refused, no diagnosis ({_cut(r.get('refusal', ''), 70)})"
    if r.get("prediction") is not None:
        flag = ""
        if "flagged" in r:
            flag = f", {'flagged' if r['flagged'] else 'not flagged'} (score {r.get('score', float('nan')):.3g})"
        return f"prediction {r['prediction']} {r.get('probability', float('nan')):.3f}{flag}"
    return "record without a prediction"


def _name(r: dict) -> str:
    return Path(r["file"]).name


def phrase(run: dict, focus: str | None = None) -> str:
    if run.get("signal"):
        return f"killed by signal {run['signal']}"
    if run["traceback"]:
        return f"crash, traceback: {_cut(run['exception'] or '?', 100)}"
    if run["exit"] == 2 and run["error"]:
        msg = re.sub(r"\$W/bundles/[^/\s]+/(bundle/)?", "B/", run["error"][len("error: "):])
        return f"refused: {_cut(msg, 140)}"
    if run["exit"] == 2 and run["stderr_first"].startswith("usage:"):
        return f"usage error: {_cut(run['stderr_tail'][-1], 90)}"
    recs = run["records"]
    if focus:
        hit = [r for r in recs if _name(r) == focus]
        if hit:
            return _rec(hit[0]) + (f" (+{len(recs) - 1} other records)" if len(recs) > 1 else "")
    if recs:
        if len(recs) == 1:
            return _rec(recs[0])
        return f"{len(recs)} records: " + "; ".join(f"{_name(r)}: {_rec(r)}" for r in recs)
    if run["exit"] == 0 and run["argv"][1] == "info":
        return "accepted: info printed, " + ("bundle 'verified'" if any(": verified" in ln for ln in run["stdout_head"])
                                             else "no verdict line")
    if run["exit"] == 0:
        return "ran, exit 0"
    return _cut(run["stderr_first"] or f"exit {run['exit']}", 110)


def _line(run: dict, word: str) -> str:
    hit = next((ln for ln in run.get("stdout_head", []) if word in ln), None)
    return f"; prints `{_cut(hit, 70)}`" if hit else ""


def _sig(run: dict) -> str:
    sigs = sorted({r.get("bundle_signature") for r in run["records"] if r.get("bundle_signature")})
    return f"; records say bundle_signature {', '.join(sigs)}" if sigs else ""


# -- cases -----------------------------------------------------------------------------------------------------

def build_inputs(b: Bench) -> dict:
    import cv2

    w = b.work
    scans = sorted((w / "scans" / "yes").glob("*.png"))
    clean = sorted((w / "scans" / "no").glob("*.png"))
    tumor = scans[0]
    lim = _load_test_module("test_input_limits")
    img_mod = _load_test_module("test_imageio")
    bombs = w / "bombs"
    bombs.mkdir()
    (bombs / "bomb.tif").write_bytes(
        lim._tiff(20000, 20000, 16, 1, lim._deflate_zeros(20000 * 20000 * 2, zlib_wrapper=True), 8))
    (bombs / "bomb.dcm").write_bytes(lim._deflated_dicom(15000, 15000))

    head = cv2.imread(str(tumor), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257
    head2 = cv2.imread(str(clean[0]), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257
    dcm = w / "dicom-only"
    dcm.mkdir()
    img_mod._dicom(dcm / "IM0001", head)
    img_mod._dicom(dcm / "1.2.840.113619.2.55.3.1", head2)
    mixed = w / "mixed"
    mixed.mkdir()
    shutil.copyfile(clean[1], mixed / "scan.png")
    img_mod._dicom(mixed / "IM0002", head)
    (mixed / "README.txt").write_text("exported from the PACS\n")
    loop = w / "loop"
    loop.mkdir()
    shutil.copyfile(clean[2], loop / "scan.png")
    os.symlink("b", loop / "a")
    os.symlink("a", loop / "b")

    odd = w / "odd"
    odd.mkdir()
    hello = np.zeros((256, 256), np.uint8)
    cv2.putText(hello, "HELLO", (20, 150), cv2.FONT_HERSHEY_SIMPLEX, 2.2, 255, 6)
    cv2.imwrite(str(odd / "hello.png"), hello)
    cv2.imwrite(str(odd / "white.png"), np.full((256, 256), 255, np.uint8))
    cv2.imwrite(str(odd / "strip.png"), np.random.default_rng(0).integers(0, 256, (2, 30000), dtype=np.uint8))
    x = cv2.imread(str(tumor), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0
    x = np.clip(x + np.random.default_rng(0).normal(0.0, 0.15, x.shape), 0.0, 1.0)  # the detector flags it
    noisy = w / "flagged" / "noisy.png"
    noisy.parent.mkdir()
    cv2.imwrite(str(noisy), np.round(x * 255.0).astype(np.uint8))
    (w / "file.txt").write_text("a regular file\n")
    (w / "outdir").mkdir()
    return {"tumor": tumor, "noisy": noisy, "scans": w / "scans", "bombs": bombs, "dicom": dcm, "mixed": mixed, "loop": loop,
            "odd": odd}


def _swap(m, _):
    m["class_names"] = list(reversed(m["class_names"]))
    return m


def _tau(v):
    def edit(m, _):
        m["detector"]["tau"] = v
        return m
    return edit


def _nan_tau(m, _):
    m["detector"]["tau"] = float("nan")
    return json.dumps(m, indent=1)  # a NaN literal, as Python's json writes it


def _traversal(m, d):
    secret = d.parent / "secret.txt"
    secret.write_text("patient list: not part of any bundle\n")
    m["files"]["../secret.txt"] = {"sha256": hashlib.sha256(secret.read_bytes()).hexdigest(),
                                   "bytes": secret.stat().st_size}
    return m


def _files_null(m, _):
    m["files"] = None
    return m


def _no_sha(m, _):
    name = sorted(m["files"])[0]
    del m["files"][name]["sha256"]
    return m


MANIFEST_EDITS = {"swapped": _swap, "tau1e9": _tau(1e9), "taunan": _nan_tau, "files-null": _files_null,
                  "no-sha": _no_sha, "list": lambda m, _: "[1,2,3]", "tau0": _tau(0.0)}


def _traversal_bundle(b: Bench, name: str) -> Path:
    """A copy one folder down (``bundles/NAME/bundle``) whose manifest lists ``../secret.txt``."""
    d = b.work / "bundles" / name / "bundle"
    d.parent.mkdir(parents=True)
    shutil.copytree(b.work / "bundle", d, symlinks=True)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(_traversal(m, d), indent=1))
    return d


def _symlink_bundle(b: Bench) -> Path:
    """A copy whose classifier.onnx is an absolute symlink to the real file, moved elsewhere."""
    sym = b.copy("symlink")
    moved = b.work / "elsewhere" / "classifier.onnx"
    moved.parent.mkdir()
    shutil.move(sym / "classifier.onnx", moved)
    os.symlink(moved.resolve(), sym / "classifier.onnx")
    return sym


def build_bundles(b: Bench) -> dict:
    """Tampered copies of the exported bundle; the ones named ``*-signed`` are re-signed (when ROOT signs)."""
    bund: dict[str, Path] = {"intact": b.work / "bundle"}
    for name, edit in MANIFEST_EDITS.items():
        bund[name] = b.copy(name, edit)
        if b.signing:
            bund[f"{name}-signed"] = b.copy(f"{name}-signed", edit)
    for name in ("traversal", "traversal-signed") if b.signing else ("traversal",):
        bund[name] = _traversal_bundle(b, name)
    bund["symlink"] = _symlink_bundle(b)
    nosig = b.copy("nosig")
    (nosig / "manifest.sig").unlink(missing_ok=True)
    bund["nosig"] = nosig
    if b.signing:
        key = b.home / "signing" / "ed25519.key"
        b.py(RESIGN, str(key), *[str(p) for n, p in bund.items() if n.endswith("-signed")])
    return bund


def _prob_diffs(r1: dict, r8: dict) -> dict:
    """Per scan in both runs: the largest difference of a class probability (None: neither has any)."""
    p1 = {_name(r): r.get("probabilities") for r in r1["records"]}
    p8 = {_name(r): r.get("probabilities") for r in r8["records"]}
    diffs = {}
    for f in sorted(set(p1) & set(p8)):
        a, c = p1[f], p8[f]
        if a is None or c is None:
            diffs[f] = None if a is None and c is None else math.inf
        else:
            diffs[f] = max(abs(a[k] - c[k]) for k in a)
    return diffs


class CaseRows:
    """The rows of :func:`cases` in order, each printed to stderr as it is made."""

    def __init__(self, b: Bench, inp: dict, bund: dict):
        self.b, self.inp, self.bund = b, inp, bund
        self.tumor = inp["tumor"].name
        self.rows: list[dict] = []

    def row(self, key, case, title, runs, behaviour, **extra) -> None:
        self.rows.append({"key": key, "case": case, "title": title, "runs": runs, "behaviour": behaviour, **extra})
        r0 = runs[0] if runs else {}
        print(f"  [{key}] exit {'/'.join(str(r['exit']) for r in runs) or '-'}  {behaviour}"
              + (f"  peak {r0.get('peak_mb')} MB" if r0 else ""), file=sys.stderr, flush=True)

    def na(self, key, case, title) -> None:
        self.rows.append({"key": key, "case": case, "title": title, "runs": [], "behaviour": "n/a: this code has no "
                          "bundle signatures", "not_applicable": True})

    def simple(self, key, case, title, args, focus=None, suffix=lambda r: "") -> dict:
        r = self.b.cli(args)
        self.row(key, case, title, [r], phrase(r, focus) + suffix(r))
        return r

    def intact_and_swapped(self) -> None:
        """Cases 1 and 2."""
        b, inp, bund, tumor = self.b, self.inp, self.bund, self.tumor
        intact = self.simple("1", "1", "intact bundle: a phantom tumor scan and a noisy copy of it",
                             b.infer(inp["tumor"], inp["noisy"], bundle=bund["intact"]), None, _sig)
        intact_pred = next((r.get("prediction") for r in intact["records"] if _name(r) == tumor), None)
        self.simple("2-info", "2", "class_names swapped in manifest.json (not re-signed): info",
                    ["info", "--bundle", str(bund["swapped"])], suffix=lambda r: _line(r, "classes"))
        r = b.cli(b.infer(inp["tumor"], bundle=bund["swapped"]))
        pred = next((x.get("prediction") for x in r["records"] if _name(x) == tumor), None)
        extra = f" (intact bundle: {intact_pred})" if pred is not None else ""
        self.row("2-infer", "2", "class_names swapped (not re-signed): infer on a tumor scan", [r],
                 phrase(r, tumor) + extra)

    def detector_tau(self) -> None:
        """Cases 3 and 4."""
        b, inp, bund = self.b, self.inp, self.bund
        for key, name, title in (("3", "tau1e9", "detector tau 1e9"), ("4", "taunan", "detector tau NaN (NaN literal)")):
            self.simple(key, key, f"{title} (not re-signed): infer on noisy.png", b.infer(inp["noisy"], bundle=bund[name]))
            if b.signing:
                self.simple(f"{key}-signed", key, f"{title}, re-signed: infer on noisy.png",
                            b.infer(inp["noisy"], bundle=bund[f"{name}-signed"]))
            else:
                self.na(f"{key}-signed", key, f"{title}, re-signed: infer on noisy.png")

    def traversal(self) -> None:
        """Case 5, not re-signed and re-signed."""
        for variant in ("traversal", "traversal-signed"):
            suffix = "" if variant == "traversal" else "-signed"
            label = "not re-signed" if variant == "traversal" else "re-signed"
            if variant not in self.bund:
                self.na(f"5-info{suffix}", "5", f"files entry ../secret.txt ({label}): info")
                self.na(f"5-calibrate{suffix}", "5", f"files entry ../secret.txt ({label}): calibrate")
                continue
            d = self.bund[variant]
            self.simple(f"5-info{suffix}", "5", f"files entry ../secret.txt ({label}): info", ["info", "--bundle", str(d)],
                        suffix=lambda r: _line(r, "secret.txt"))
            self._calibrate_traversal(d, suffix, label)

    def _calibrate_traversal(self, d: Path, suffix: str, label: str) -> None:
        cal_parent = d.parent / "calibrated"
        cal_parent.mkdir()
        out = cal_parent / "new"
        r = self.b.cli(["calibrate", "--bundle", str(d), "--clean", str(self.inp["scans"]), "--out", str(out),
                        "--threads", "1", "--min-scans", "5", "--quiet"])
        leaked = (cal_parent / "secret.txt").exists()
        made = out.is_dir() and (out / "manifest.json").exists()
        self.row(f"5-calibrate{suffix}", "5", f"files entry ../secret.txt ({label}): calibrate --out OUT", [r],
                 phrase(r) + ("; new bundle written" if made and r["exit"] == 0 else "")
                 + f"; secret.txt written outside OUT: {'YES' if leaked else 'no'}", secret_outside_out=leaked)

    def hostile_inputs(self) -> None:
        """Cases 6 to 14: a symlinked model, decompression bombs, odd folders and odd images."""
        b, inp, bund = self.b, self.inp, self.bund
        self.simple("6", "6", "classifier.onnx an absolute symlink to the real file moved elsewhere: infer",
                    b.infer(inp["tumor"], bundle=bund["symlink"]), self.tumor)
        self.simple("7", "7", "20000x20000 16-bit deflate TIFF (decodes to 800 MB): infer",
                    b.infer(inp["bombs"] / "bomb.tif", bundle=bund["intact"]), "bomb.tif")
        self.simple("8", "8", "15000x15000 deflated DICOM (pixel data 450 MB): infer",
                    b.infer(inp["bombs"] / "bomb.dcm", bundle=bund["intact"]), "bomb.dcm")
        self.simple("9", "9", "folder of extensionless DICOMs (IM0001, 1.2.840.113619.2.55.3.1): infer",
                    b.infer(inp["dicom"], bundle=bund["intact"]))
        self.simple("10", "10", "mixed folder (scan.png, IM0002 DICOM, README.txt): infer",
                    b.infer(inp["mixed"], bundle=bund["intact"]))
        self.simple("11", "11", "folder with a symlink loop (a->b, b->a) beside scan.png: infer",
                    b.infer(inp["loop"], bundle=bund["intact"]))
        for key, f, title in (("12", "hello.png", "text image 'HELLO'"), ("13", "white.png", "all-white image"),
                              ("14", "strip.png", "2x30000 random strip")):
            self.simple(key, key, f"{title}: infer", b.infer(inp["odd"] / f, bundle=bund["intact"]), f)

    def batch_sizes(self) -> None:
        """Case 15: the same scans at batch size 1 and 8, every scan purified."""
        b, inp, bund = self.b, self.inp, self.bund
        b15 = bund["tau0-signed"] if b.signing else bund["tau0"]
        r1 = b.cli(b.infer(inp["scans"], bundle=b15, extra=["--batch-size", "1"]))
        r8 = b.cli(b.infer(inp["scans"], bundle=b15, extra=["--batch-size", "8"]))
        diffs = _prob_diffs(r1, r8)
        flagged = sum(bool(r.get("flagged")) for r in r8["records"])
        if r1["traceback"] or r8["traceback"] or r1["exit"] or r8["exit"]:
            beh = f"batch 1: {phrase(r1)} | batch 8: {phrase(r8)}"
        else:
            differ = [f for f, d in diffs.items() if d is None or d > 1e-6]
            mx = max((d for d in diffs.values() if d is not None), default=0.0)
            beh = (f"{len(diffs)} scans, {flagged} flagged and purified; probabilities "
                   + (f"identical at both batch sizes (max |dp| {mx:.1e})" if not differ
                      else f"differ for {len(differ)} of {len(diffs)} scans (max |dp| {mx:.3f})"))
        self.row("15", "15", "same scans at --batch-size 1 and 8, tau 0 (every scan purified)", [r1, r8], beh,
                 max_abs_prob_diff={f: d for f, d in diffs.items()})

    def bad_manifests(self) -> None:
        """Cases 16 to 18: manifests of the wrong shape, not re-signed and re-signed."""
        b, bund = self.b, self.bund
        for key, name, title in (("16", "list", "manifest.json is [1,2,3]"),
                                 ("17", "files-null", "manifest 'files': null"),
                                 ("18", "no-sha", "a files entry without sha256")):
            self.simple(key, key, f"{title} (not re-signed): info", ["info", "--bundle", str(bund[name])])
            if b.signing:
                self.simple(f"{key}-signed", key, f"{title}, re-signed: info",
                            ["info", "--bundle", str(bund[f"{name}-signed"])])
            else:
                self.na(f"{key}-signed", key, f"{title}, re-signed: info")

    def outputs(self) -> None:
        """Cases 19 to 22: bad ``--out`` paths and a closed stdout."""
        b, inp, bund, w = self.b, self.inp, self.bund, self.b.work
        for key, out, title in (("19", w / "outdir", "--out an existing folder"),
                                ("20", w / "missing" / "r.jsonl", "--out in a missing folder"),
                                ("21", w / "file.txt" / "r.jsonl", "--out under a regular file (file.txt/r.jsonl)")):
            r = b.cli(b.infer(inp["tumor"], bundle=bund["intact"], extra=["--out", str(out)]))
            written = out.is_file()
            self.row(key, key, f"{title}: infer", [r], phrase(r) + f"; results file written: {'yes' if written else 'no'}")
        r = b.cli(["info", "--bundle", str(bund["intact"])], close_stdout=True)
        self.row("22", "22", "info with stdout a pipe closed at once (as `| head -c 1`)", [r],
                 phrase(r) if (r["traceback"] or r["exit"]) else "quiet, exit 0" + (f"; stderr: {_cut(r['stderr_first'], 80)}"
                                                                                    if r["stderr_first"] else ""))

    def unsigned(self) -> None:
        """Case 23: a bundle without manifest.sig, refused and allowed."""
        b, inp, bund = self.b, self.inp, self.bund
        self.simple("23", "23", "bundle without manifest.sig: infer", b.infer(inp["tumor"], bundle=bund["nosig"]),
                    self.tumor, _sig)
        self.simple("23-allow", "23", "bundle without manifest.sig: infer --allow-unsigned",
                    b.infer(inp["tumor"], bundle=bund["nosig"], extra=["--allow-unsigned"]), self.tumor, _sig)


def cases(b: Bench, inp: dict, bund: dict) -> list[dict]:
    """Rows: {key, case, title, runs, behaviour} (runs are not made where the code has no signatures)."""
    c = CaseRows(b, inp, bund)
    for group in (c.intact_and_swapped, c.detector_tau, c.traversal, c.hostile_inputs, c.batch_sizes,
                  c.bad_manifests, c.outputs, c.unsigned):
        group()
    return c.rows


# -- reports ---------------------------------------------------------------------------------------------------

def _cmd(run: dict) -> str:
    skip = {"--threads": 1, "--quiet": 0, "--secret": 1}
    out, argv, i = [], run["argv"], 0
    while i < len(argv):
        if argv[i] in skip:
            i += 1 + skip[argv[i]]
            continue
        out.append(argv[i])
        i += 1
    return " ".join(out)


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _exit(row: dict) -> str:
    return "/".join(str(r["exit"]) for r in row["runs"]) or "—"


def _tb(row: dict) -> str:
    return "—" if not row["runs"] else ("yes" if any(r["traceback"] for r in row["runs"]) else "no")


def _peak(row: dict) -> str:
    p = [r["peak_mb"] for r in row["runs"] if r.get("peak_mb") is not None]
    return ", ".join(f"{x:.0f}" for x in p) or "—"


def write_report(out: Path, label: str, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "trust.json").write_text(json.dumps({"label": label, **meta, "cases": rows}, indent=1) + "\n")
    lines = [f"# Scanner-side trust boundary: {label}", "",
             f"Code: `{meta['code_revision']}`{' (working tree)' if meta.get('dirty') else ''}; "
             f"bundle signatures in this code: {'yes' if meta['signing'] else 'no'}; "
             f"{meta['date']}; {meta['python']}; every child under RLIMIT_AS {AS_LIMIT >> 30} GB, "
             "OMP_NUM_THREADS=1, `--threads 1`. `$W` is the scratch folder; `B` names a bundle copy under "
             "`$W/bundles`. Peak MB: the child's VmHWM at exit.", "",
             *table(["case", "command", "exit", "behaviour", "traceback", "peak MB"],
                    [(f"{r['key']}: {_md(r['title'])}", " ; ".join(f"`{_md(_cmd(x))}`" for x in r["runs"]) or "—",
                      _exit(r), _md(r["behaviour"]), _tb(r), _peak(r)) for r in rows], align="l" * 6)]
    (out / "trust.md").write_text("\n".join(lines) + "\n")


def merge(top: Path) -> Path:
    before = json.loads((top / "before" / "trust.json").read_text())
    after = json.loads((top / "after" / "trust.json").read_text())
    bmap = {r["key"]: r for r in before["cases"]}
    lines = [
        "# Scanner-side trust boundary, before and after",
        "",
        f"Before: `{before['code_revision']}`; after: `{after['code_revision']}`"
        f"{' (working tree)' if after.get('dirty') else ''}. Each side trains the tiny profile (synth:80, one "
        "epoch per component), exports site 0 as `tests/conftest.py` does, and runs `runtime.cli.main` of its own code "
        "on tampered copies of that bundle and on hostile inputs, each in a child process (cwd and PYTHONPATH the "
        "code's root, RLIMIT_AS 4 GB, OMP_NUM_THREADS=1, `--threads 1`). The after side's export key is trusted "
        "(`$MEDFEDPURE_HOME/trusted-keys`); rows marked re-signed sign the tampered manifest again with that key, "
        "to reach the check behind the signature. Peak MB is the child's VmHWM at exit. Per side: "
        "[before/trust.md](before/trust.md), [after/trust.md](after/trust.md) (commands, first stderr line, records "
        "in the JSON).",
        "",
    ]
    compared = []
    for r in after["cases"]:
        bb = bmap.get(r["key"])
        b_exit = _exit(bb) if bb else "—"
        b_beh = (bb["behaviour"] + (" (traceback)" if bb["runs"] and _tb(bb) == "yes" else "")) if bb else "—"
        a_beh = r["behaviour"] + (" (traceback)" if _tb(r) == "yes" else "")
        peak = f"{_peak(bb) if bb else '—'} / {_peak(r)}"
        compared.append((f"{r['key']}: {_md(r['title'])}", b_exit, _md(b_beh), _exit(r), _md(a_beh), peak))
    lines += table(["case", "before: exit", "before: behaviour", "after: exit", "after: behaviour",
                    "peak MB before / after"], compared, align="l" * 6)
    peaks = {k: [r["peak_mb"] for r in bmap[k]["runs"]] for k in ("7", "8") if k in bmap}
    lines += [
        "",
        "Notes:",
        "",
        "- The tiny profile's classifier, one epoch on 80 synthetic scans, gives probabilities near 0.5; the "
        "predictions show what the runtime does with a scan, not how well it diagnoses. In case 1 the noisy copy "
        "(Gaussian noise, sigma 0.15) is flagged by the intact bundle's detector; cases 3 and 4 run that scan.",
        "- Cases 7 and 8, before: the whole image was decoded, and the allocation of its floating-point copy failed "
        "under the 4 GB address-space limit the children run with "
        f"(peaks {', '.join(f'{k}: {v[0]:.0f} MB' for k, v in peaks.items() if v and v[0] is not None)}). "
        "After: refused from the header, before decoding.",
        "- Rows marked re-signed stand for a manifest edited by a holder of a trusted key; they show the check behind "
        "the signature. An edit that no check can see (class names in another order, case 2) is caught only by "
        "the signature.",
        "- Exit codes: 0 every input succeeded (diagnosed or refused), 3 some inputs failed (each failure in its "
        "record), 2 usage or bundle error, 1 an uncaught exception.",
        "",
        "Reproduce (from the repository root, after code = this tree, before code = a worktree at the before commit):",
        "",
        "```",
        f"git worktree add /tmp/before {before['code_revision'][:7]}",
        "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.trust_boundary --code /tmp/before --label before "
        "--out benchmarks/results/trust-boundary/before",
        "OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.trust_boundary --code . --label after "
        "--out benchmarks/results/trust-boundary/after",
        ".venv/bin/python -m benchmarks.trust_boundary --merge benchmarks/results/trust-boundary",
        "git worktree remove --force /tmp/before",
        "```",
        "",
    ]
    (top / "README.md").write_text("\n".join(lines))
    return top / "README.md"


def _revision(root: Path) -> tuple[str, bool]:
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                     "--", "runtime", "export", "training"], capture_output=True, text=True).stdout.strip())
        return rev, dirty
    except (OSError, subprocess.CalledProcessError):
        return "?", False


def run(code: str, label: str, out: str, python: str = sys.executable, keep: bool = False) -> dict:
    root = Path(code).resolve()
    work = Path(tempfile.mkdtemp(prefix="trust-boundary-"))
    t0 = time.perf_counter()
    try:
        b = Bench(root, work, python)
        print(f"[{label}] training and exporting with {root} in {work}", file=sys.stderr, flush=True)
        imported = json.loads(b.py(SETUP, str(work)).strip().splitlines()[-1])
        for name, where in imported.items():
            if Path(where).parent != root:
                raise RuntimeError(f"{name} imported from {where}, not from {root}")
        if b.signing:
            trusted = b.home / "trusted-keys"
            trusted.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(b.home / "signing" / "ed25519.pub", trusted / "export.pub")
        t_setup = time.perf_counter() - t0
        inp = build_inputs(b)
        bund = build_bundles(b)
        print(f"[{label}] setup {t_setup:.0f} s; cases:", file=sys.stderr, flush=True)
        rows = cases(b, inp, bund)
        rev, dirty = _revision(root)
        meta = {"code": str(root) if root != HERE else ".", "code_revision": rev, "dirty": dirty,
                "signing": b.signing, "date": dt.datetime.now().isoformat(timespec="seconds"),
                "python": f"Python {sys.version.split()[0]}", "setup_s": round(t_setup, 1),
                "total_s": round(time.perf_counter() - t0, 1), "rlimit_as_bytes": AS_LIMIT}
        write_report(Path(out), label, meta, rows)
        print(f"[{label}] wrote {out}/trust.json and trust.md in {meta['total_s']:.0f} s", file=sys.stderr)
        return meta
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trust_boundary", description=__doc__.split("\n\n")[0])
    p.add_argument("--code", help="root of the code under test (its training, export and runtime packages)")
    p.add_argument("--label", help="before or after (the report's name)")
    p.add_argument("--out", help="folder for trust.json and trust.md")
    p.add_argument("--python", default=sys.executable, help="interpreter for the child processes")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    p.add_argument("--merge", metavar="DIR", help="write DIR/README.md from DIR/before and DIR/after")
    args = p.parse_args(argv)
    if args.merge:
        print(f"wrote {merge(Path(args.merge))}")
        return 0
    if not (args.code and args.label and args.out):
        p.error("--code, --label and --out are required (or --merge DIR)")
    run(args.code, args.label, args.out, python=args.python, keep=args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
