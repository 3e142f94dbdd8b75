"""Write one site's bundle: ONNX graphs (fp32 and fp16), parity checks, and ``manifest.json``.

``python -m export --run runs/NAME --site S --out bundles/NAME-site-S``

The bundle is what a hospital installs next to its scanner (DESIGN.md):

    classifier.onnx, detector.onnx, denoiser.onnx         fp32, opset >= 17, dynamic batch
    classifier.fp16.onnx, ...                             fp16 weights and compute, fp32 inputs/outputs
                                                          (the noise-floor detector stays fp32: see below)
    denoiser.int8.onnx                                    convolutions int8, calibrated on validation scans
                                                          (``export.quantize``; left out if its parity check fails)
    classifier.pt2, ...                                   the same graphs for the torch engine (torch.export)
    ood.onnx, ood.pt2                                     the out-of-distribution score (``training.ood``),
                                                          fp32 at every precision
    manifest.json                                         see :func:`build_manifest`
    manifest.sig                                          Ed25519 signature of manifest.json (``runtime.signing``)

Parity is checked here, on the site's own validation scans, before the
bundle is written (the same figures on its test scans are recorded beside
them, without deciding): ONNX Runtime (CPU) against PyTorch. fp32: probabilities within
1e-4, detection scores within 1e-3 relative, epsilon within 1e-4; fp16:
probabilities within 1e-2 and no prediction flip. A bundle that fails is not
written. The noise-floor detection score is computed in fp32 in both
variants: its values (~1e-3) are below what fp16 arithmetic on [0, 1] pixels
resolves, and it costs a 3x3 convolution.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from export.graphs import ClassifierGraph, DenoiserGraph, detector_graph, score_description
from runtime.bundle import sha256
from training import config as cfgmod
from training.checkpoint import code_revision
from training.diffusion import GaussianDiffusion, to_diffusion_space

SCHEMA_VERSION = 2
OPSET = 17
TOLERANCES = {"probs_abs": 1e-4, "score_rel": 1e-3, "eps_abs": 1e-4, "probs_abs_fp16": 1e-2, "ood_rel": 1e-3}
OOD_REFUSAL_RATE = 0.01


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], opset: int) -> None:
    import onnx

    module.eval()
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          opset_version=opset, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _toposort(graph) -> None:
    """Order ``graph.node`` so every input is produced before it is used (the fp16 converter leaves casts last)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("the fp16 graph has a cycle or an undefined input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _torch_export(module: torch.nn.Module, args: tuple, path: Path) -> Path:
    """The reference graph for the runtime's torch engine (``torch.export``, dynamic batch; no training code needed)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    ep = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
    torch.export.save(ep, str(path))
    return path


def _fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(model.graph)
    onnx.save(model, str(dst))
    onnx.checker.check_model(onnx.load(str(dst)))


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _batched(fn, *arrays: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([fn(*(a[i : i + batch] for a in arrays)) for i in range(0, len(arrays[0]), batch)])


def check_parity(graphs: dict, files: dict[str, Path], images: np.ndarray, n_eps: int = 16, seed: int = 0) -> dict:
    """ORT vs PyTorch on ``images`` ``[N, 1, S, S]``; raises ValueError past a tolerance."""
    x = images.astype(np.float32)
    res: dict = {"n_scans": int(len(x))}
    with torch.no_grad():
        p_ref = _batched(lambda a: graphs["classifier"](torch.from_numpy(a)).numpy(), x)
        s_ref = _batched(lambda a: graphs["detector"](torch.from_numpy(a)).numpy(), x)
        diffusion = GaussianDiffusion()
        g = torch.Generator().manual_seed(seed)
        xe = torch.from_numpy(x[:n_eps])
        t = torch.tensor([50, 100] * ((len(xe) + 1) // 2))[: len(xe)]
        x_t = diffusion.q_sample(to_diffusion_space(xe), t, torch.randn(xe.shape, generator=g)).numpy()
        tf = t.float().numpy()
        e_ref = graphs["denoiser"](torch.from_numpy(x_t), torch.from_numpy(tf)).numpy()
    for prec in ("fp32", "fp16"):
        sc, sd, su = (_session(files[f"{c}.{prec}"]) for c in ("classifier", "detector", "denoiser"))
        p = _batched(lambda a, s=sc: s.run(None, {"image": a})[0], x)
        s = _batched(lambda a, s=sd: s.run(None, {"image": a})[0], x)
        e = su.run(None, {"x_t": x_t, "t": tf})[0]
        r = {
            "probs_max_abs": float(np.abs(p - p_ref).max()),
            "score_max_rel": float((np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-12)).max()),
            "eps_max_abs": float(np.abs(e - e_ref).max()),
            "prediction_flips": int((p.argmax(1) != p_ref.argmax(1)).sum()),
        }
        res[prec] = r
    if "ood" in graphs:
        with torch.no_grad():
            o_ref = _batched(lambda a: graphs["ood"](torch.from_numpy(a)).numpy(), x)
        so = _session(files["ood.fp32"])
        o = _batched(lambda a, s=so: s.run(None, {"image": a})[0], x)
        res["ood"] = {"score_max_rel": float((np.abs(o - o_ref) / np.maximum(np.abs(o_ref), 1e-6)).max())}
    f32, f16 = res["fp32"], res["fp16"]
    problems = []
    if "ood" in res and res["ood"]["score_max_rel"] > TOLERANCES["ood_rel"]:
        problems.append(f"out-of-distribution scores differ by {res['ood']['score_max_rel']:.2e} (relative)")
    if f32["probs_max_abs"] > TOLERANCES["probs_abs"]:
        problems.append(f"fp32 probabilities differ by {f32['probs_max_abs']:.2e} > {TOLERANCES['probs_abs']}")
    if f32["score_max_rel"] > TOLERANCES["score_rel"]:
        problems.append(f"fp32 detection scores differ by {f32['score_max_rel']:.2e} (relative) > {TOLERANCES['score_rel']}")
    if f32["eps_max_abs"] > TOLERANCES["eps_abs"]:
        problems.append(f"fp32 epsilon differs by {f32['eps_max_abs']:.2e} > {TOLERANCES['eps_abs']}")
    if f16["probs_max_abs"] > TOLERANCES["probs_abs_fp16"]:
        problems.append(f"fp16 probabilities differ by {f16['probs_max_abs']:.2e} > {TOLERANCES['probs_abs_fp16']}")
    if f16["prediction_flips"]:
        problems.append(f"fp16 flips {f16['prediction_flips']} of {len(x)} predictions")
    res["tolerances"] = dict(TOLERANCES)
    res["passed"] = not problems
    if problems:
        raise ValueError("parity check failed: " + "; ".join(problems))
    return res


def build_manifest(*, profile: cfgmod.Profile, site: int, run: Path, class_names: list[str], tau: float,
                   n_val: int, files: dict[str, Path], split_digest: str, metrics: dict, parity: dict,
                   opset: int, ood: dict) -> dict:
    d, den = profile.defense, profile.denoiser
    return {
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "input": {"name": "image", "shape": [None, 1, profile.image_size, profile.image_size], "dtype": "float32",
                  "range": [0.0, 1.0]},
        "preprocessing": asdict(profile.preprocess),
        "detector": {
            "tau": tau,
            "calibration": {"rule": d.rule, "flag_rate": d.flag_rate, "split": "val", "n_scans": n_val,
                            "statistic": "quantile 1 - flag_rate of clean validation scores"},
            **({"mask_ratio": profile.detector.mask_ratio, "mask_seed": profile.detector.mask_seed}
               if d.score == "mae" else {}),
            "score": score_description(profile), "score_kind": d.score,
        },
        "purification": {
            "schedule": {"kind": "linear", "num_steps": den.num_steps, "beta_start": den.beta_start, "beta_end": den.beta_end},
            "t_star": {"t_min": d.t_min, "t_max": d.t_max, "ref_ratio": d.ref_ratio, "quantum": d.quantum,
                       "formula": "t = t_min + clip((s - tau) / (tau * (ref_ratio - 1)), 0, 1) * (t_max - t_min), "
                                  "rounded to a multiple of quantum, clipped to [t_min, t_max]"},
            "mode": d.mode, "draws": d.draws,
            "steps": d.steps, "sampler": "ddim eta=0 on a respacing from t*" if d.steps else "ddpm ancestral, every step",
            "space": "x in [0, 1] -> 2x - 1; the denoiser predicts epsilon of x_t at integer timestep t (given as float)",
        },
        "ood": ood,
        "files": {name: {"sha256": sha256(path), "bytes": path.stat().st_size} for name, path in sorted(files.items())},
        "graphs": {
            "classifier": {"inputs": {"image": "[N,1,S,S] float32"}, "outputs": {"probs": "[N,C] float32"}},
            "detector": {"inputs": {"image": "[N,1,S,S] float32"}, "outputs": {"score": "[N] float32"}},
            "denoiser": {"inputs": {"x_t": "[N,1,S,S] float32", "t": "[N] float32"}, "outputs": {"eps": "[N,1,S,S] float32"}},
            "ood": {"inputs": {"image": "[N,1,S,S] float32"}, "outputs": {"score": "[N] float32"}},
            "opset": opset, "precisions": ["fp32", "fp16"] + (["int8"] if "denoiser.int8.onnx" in files else []),
            "int8": "denoiser.int8.onnx (convolutions int8, the rest fp32) beside the fp32 classifier and detector",
        },
        "provenance": {"run": str(run), "site": site, "profile": cfgmod.to_dict(profile), "split_digest": split_digest,
                       "code_revision": code_revision(), "metrics": metrics},
        "parity": parity,
    }


def _export_int8(profile: cfgmod.Profile, s, files: dict[str, Path], tmp: Path, images: np.ndarray,
                 labels: np.ndarray, log, report: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """``denoiser.int8.onnx`` calibrated on the site's validation scans, checked on ``images``; its parity record.

    ``images`` are validation scans (the gate); ``report``, test scans and
    labels whose figures are recorded beside it (``test``) without deciding.

    A failed check leaves the file out of the bundle (the fp32 and fp16
    graphs are unaffected) and says why in the record.
    """
    from export.quantize import calibration_inputs, int8_parity, quantize_denoiser
    from runtime import schedule
    from runtime.pipeline import PurifyConfig

    d, den = profile.defense, profile.denoiser
    cfg = PurifyConfig(tau=float(s.pipe.tau), t_min=d.t_min, t_max=d.t_max, ref_ratio=d.ref_ratio, quantum=d.quantum,
                       steps=d.steps, num_steps=den.num_steps, beta_start=den.beta_start, beta_end=den.beta_end)
    abar = schedule.alpha_bar_by_step(den.num_steps, den.beta_start, den.beta_end)
    val = s.data["val"]
    feeds = calibration_inputs(val.images, abar, d.t_min, d.t_max, d.quantum, n=64)
    dst = tmp / "denoiser.int8.onnx"
    quantize_denoiser(files["denoiser.fp32"], dst, feeds)
    sessions = {"denoiser.fp32": _session(files["denoiser.fp32"]), "denoiser.int8": _session(dst),
                "classifier.fp32": _session(files["classifier.fp32"])}
    try:
        res = int8_parity(sessions, images, labels, cfg, t_star=d.t_max)
    except ValueError as err:
        dst.unlink()
        log(f"  int8 denoiser left out: {err}")
        return {"passed": False, "reason": str(err)}
    res["split"] = "val"
    res["calibration"] = {"split": "val", "n_scans": len(feeds), "t_star": [d.t_min, d.t_max, d.quantum],
                          "method": "min-max, QDQ: convolutions int8 (weights per channel), the rest fp32"}
    if report is not None and len(report[0]):
        res["test"] = int8_parity(sessions, report[0], report[1], cfg, t_star=d.t_max, check=False)
    files["denoiser.int8"] = dst
    log(f"  int8 denoiser: purified images differ from fp32 by {res['purified_mean_abs_int8_vs_fp32']:.4f} "
        f"(another noise draw: {res['purified_mean_abs_other_noise_vs_fp32']:.4f}); prediction flips "
        f"{res['prediction_flips_int8']} (another noise draw: {res['prediction_flips_other_noise']}) of {len(images)}")
    return res


def _fit_ood(sites: list, profile: cfgmod.Profile, refusal_rate: float, log) -> tuple[torch.nn.Module, dict]:
    """The out-of-distribution score graph and its threshold, from the clean scans of ``sites``.

    With several sites (a federated run), each site contributes the sums of
    its training scans' features (``training.ood.feature_stats``) and its
    validation scores; no scan is pooled. One site alone (a centralised run,
    or a site exporting on its own) uses its own.
    """
    from training.ood import (
        add_stats,
        feature_stats,
        mahalanobis_from_stats,
        refusal_threshold,
        score_images,
    )

    if not 0.0 < refusal_rate < 0.5:
        raise ValueError(f"the out-of-distribution refusal rate must be in (0, 0.5), got {refusal_rate}")
    k = profile.classifier.num_classes
    model = sites[0].classifier
    stats = add_stats([feature_stats(s.classifier, s.data["train"].images, s.data["train"].labels, k) for s in sites])
    graph = mahalanobis_from_stats(model, stats)
    val_scores = np.concatenate([score_images(graph, s.data["val"].images) for s in sites])
    threshold = refusal_threshold(val_scores, refusal_rate)
    scope = "federation" if len(sites) > 1 else "site"
    n_train = int(stats["n"].sum())
    log(f"  out-of-distribution score: Mahalanobis on {n_train} training scans ({scope}, {len(sites)} site(s)); "
        f"threshold {threshold:.4g} refuses {refusal_rate:.0%} of {len(val_scores)} validation scans")
    return graph, {
        "file": "ood.onnx", "kind": "mahalanobis", "threshold": threshold,
        "score": "min over classes of the Mahalanobis distance of the classifier's shared feature psi(x) "
                 "(class means and a shared covariance of clean training scans)",
        "calibration": {"split": "val", "scope": scope, "sites": len(sites), "n_scans": int(len(val_scores)),
                        "refusal_rate": refusal_rate,
                        "statistic": "quantile 1 - refusal_rate of clean validation scores"},
        "fit": {"split": "train", "scope": scope, "sites": len(sites), "n_scans": n_train,
                "statistics": "per-class counts and feature sums, sum of feature outer products (summed over sites)"},
    }


def shared_features(sites: list) -> bool:
    """Whether every site computes the same psi (shared experts, no site-local batch norm)."""
    if len(sites) < 2:
        return False
    ref = {k: v for k, v in sites[0].classifier.state_dict().items() if not k.startswith("gates.")}
    for s in sites[1:]:
        st = s.classifier.state_dict()
        if any(not torch.equal(v, st[k]) for k, v in ref.items()):
            return False
    return True


def _load_site(run: Path, site: int, defense: dict | None) -> tuple[cfgmod.Profile, list, object]:
    """The run's profile, all its sites, and site ``site``, which must have a detector and a denoiser."""
    from training.runs import load_sites

    profile, sites, _ = load_sites(run, defense=defense)
    match = [s for s in sites if s.site == site]
    if not match:
        raise ValueError(f"{run} has no site {site}; sites: {[s.site for s in sites]}")
    s = match[0]
    if s.pipe is None:
        raise ValueError(f"{run}: no detector and denoiser for this run (method "
                         f"{profile.federated.method}); only a defended run can be bundled")
    return profile, sites, s


def _site_graphs(s, sites: list, profile: cfgmod.Profile, ood_refusal_rate: float, log) -> tuple[dict, dict]:
    """The graphs to export for site ``s`` (classifier, detector, denoiser, ood) and the ood manifest entry."""
    # the experts, hence psi, are the same at every site; a personalized head's site model is checked below
    ood_graph, ood = _fit_ood(sites if shared_features(sites) else [s], profile, ood_refusal_rate, log)
    graphs = {"classifier": ClassifierGraph(s.classifier).eval(),
              "detector": detector_graph(s.pipe.detector, profile).eval(),
              "denoiser": DenoiserGraph(s.pipe.denoiser).eval(),
              "ood": ood_graph}
    return graphs, ood


def _export_graphs(graphs: dict, profile: cfgmod.Profile, tmp: Path, opset: int, log,
                   torch_programs: bool = True) -> dict[str, Path]:
    """Write every graph to ``tmp``: ONNX fp32 and fp16 (the ood graph: fp32 only) and, with ``torch_programs``,
    ``.pt2`` for the torch engine; the files by key."""
    size = profile.image_size
    img = torch.rand(2, 1, size, size)
    files: dict[str, Path] = {}
    for name, args, ins, outs in (("classifier", (img,), ["image"], ["probs"]),
                                  ("detector", (img,), ["image"], ["score"]),
                                  ("denoiser", (img * 2 - 1, torch.tensor([50.0, 100.0])), ["x_t", "t"], ["eps"])):
        f32 = tmp / f"{name}.onnx"
        _export(graphs[name], args, f32, ins, outs, opset)
        f16 = tmp / f"{name}.fp16.onnx"
        if name == "detector" and profile.defense.score == "floor":
            # The noise floor compares Laplacians of ~1e-3 against tau ~1e-3: fp16 cannot resolve that,
            # and the graph is a convolution and a TopK, so its "fp16" variant computes in fp32.
            shutil.copyfile(f32, f16)
        else:
            _fp16(f32, f16)
        files[f"{name}.fp32"], files[f"{name}.fp16"] = f32, f16
        if torch_programs:
            files[f"{name}.pt2"] = _torch_export(graphs[name], args, tmp / f"{name}.pt2")
        log(f"  exported {name}: {f32.stat().st_size / 1e6:.1f} MB fp32, {f16.stat().st_size / 1e6:.1f} MB fp16")
    _export(graphs["ood"], (img,), tmp / "ood.onnx", ["image"], ["score"], opset)
    files["ood.fp32"] = tmp / "ood.onnx"
    if torch_programs:
        files["ood.pt2"] = _torch_export(graphs["ood"], (img,), tmp / "ood.pt2")
    return files


def _parity_scans(s, parity_scans: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The first ``parity_scans`` validation and test scans of site ``s`` (all when <= 0), each ``([N, 1, S, S], [N])``."""
    val, test = s.data["val"], s.data["test"]
    n = len(val) if parity_scans <= 0 else min(len(val), parity_scans)
    nt = len(test) if parity_scans <= 0 else min(len(test), parity_scans)
    return (val.images[:n][:, None], val.labels[:n]), (test.images[:nt][:, None], test.labels[:nt])


def _site_parity(graphs: dict, files: dict[str, Path], images: np.ndarray, report: np.ndarray, log) -> dict:
    """:func:`check_parity` on validation ``images`` (raises past a tolerance), and on test scans ``report`` (recorded)."""
    parity = check_parity(graphs, files, images)
    parity["split"] = "val"
    log(f"  parity on {len(images)} validation scans: fp32 probs {parity['fp32']['probs_max_abs']:.1e}, scores "
        f"{parity['fp32']['score_max_rel']:.1e} rel, eps {parity['fp32']['eps_max_abs']:.1e}; fp16 probs "
        f"{parity['fp16']['probs_max_abs']:.1e}, {parity['fp16']['prediction_flips']} flips")
    try:
        parity["test"] = check_parity(graphs, files, report)
    except ValueError as err:  # reported, not a gate
        parity["test"] = {"n_scans": len(report), "passed": False, "reason": str(err)}
    return parity


def _site_metrics(run: Path, site: int, s) -> dict:
    """The site's scan counts, and the run's robustness figures when ``reports/robustness.json`` exists."""
    metrics = {"site_val_scans": len(s.data["val"]), "site_test_scans": len(s.data["test"])}
    rob = run / "reports" / "robustness.json"
    if rob.exists():
        rep = json.loads(rob.read_text())
        metrics["robustness_mean"] = rep.get("mean")
        metrics["robustness_site"] = next((r for r in rep.get("sites", []) if r.get("site") == site), None)
    return metrics


def _sign_and_place(manifest: dict, tmp: Path, out: Path, key_path: Path, signer: str, log) -> None:
    """Write ``manifest.json`` into ``tmp``, sign it with ``key_path`` and move ``tmp`` to ``out``."""
    from runtime import signing

    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False))
    sig = signing.sign_manifest(tmp, key_path, signer=signer, role="export")
    log(f"  signed with key {sig['key_id']} ({key_path})")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_site(run: str | Path, site: int, out: str | Path, *, opset: int = OPSET, parity_scans: int = 64,
                force: bool = False, log=print, defense: dict | None = None, int8: bool = True,
                signing_key: str | Path | None = None, signer: str | None = None,
                ood_refusal_rate: float = OOD_REFUSAL_RATE, provenance: dict | None = None,
                torch_programs: bool = True) -> dict:
    """Export site ``site`` of ``run`` to the bundle folder ``out``, signed; returns the manifest.

    ``signing_key``: an Ed25519 private key (PEM); by default this machine's
    (``runtime.signing.default_signing_key``), made on first use.
    ``provenance``: entries that replace the manifest's provenance (a site
    exporting from its deployment state names its run and site here).
    ``torch_programs=False``: no ``.pt2`` graphs (``--engine torch`` then refuses the bundle); ONNX Runtime and
    TensorRT read the ONNX files only.
    """
    run, out = Path(run), Path(out)
    if opset < 17:
        raise ValueError(f"opset must be 17 or newer, got {opset}")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty; choose a new --out or pass --force")
    profile, sites, s = _load_site(run, site, defense)
    t0 = time.perf_counter()
    from runtime.signing import signing_key_path

    key_path = signing_key_path(signing_key, lambda m: log(f"  {m}"))
    graphs, ood = _site_graphs(s, sites, profile, ood_refusal_rate, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    try:
        files = _export_graphs(graphs, profile, tmp, opset, log, torch_programs)
        # the ship gates decide on validation scans; the same figures on test scans are reported beside them
        (images, labels), report = _parity_scans(s, parity_scans)
        parity = _site_parity(graphs, files, images, report[0], log)
        if int8:
            parity["int8"] = _export_int8(profile, s, files, tmp, images, labels, log, report=report)
        named = {p.name: p for p in files.values()}
        manifest = build_manifest(profile=profile, site=site, run=run, class_names=s.data.class_names, tau=s.pipe.tau,
                                  n_val=len(s.data["val"]), files=named, split_digest=s.data.digest,
                                  metrics=_site_metrics(run, site, s), parity=parity, opset=opset, ood=ood)
        manifest["provenance"].update(provenance or {})
        _sign_and_place(manifest, tmp, out, key_path, signer or f"export of {run.name} site {site}", log)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"bundle written to {out} ({time.perf_counter() - t0:.0f} s)")
    return manifest
