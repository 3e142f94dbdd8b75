"""The proof report of a centrally trained run: what each component does on held-out test scans.

``python -m training report --run RUN`` writes ``RUN/report/report.md`` and
``report.json`` (+ PNG figures):

* classifier: test accuracy (checkpoint chosen on validation), per class, and
  by original image size; whether image size still predicts the label after
  preprocessing (the Br35H size shortcut);
* detector: score distributions on clean test scans and on the same scans
  with uniform sign noise of L-inf 0.015, ROC AUC;
* denoiser: PSNR of purified vs. original clean scans at t* = 50 and 100, a
  grid of original / noised / purified, classifier accuracy on purified scans;
* wall time per epoch of each component.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from runtime.markdown import table
from training import config as cfgmod
from training.data.datasets import Dataset, load_dataset
from training.diffusion import GaussianDiffusion, purify, to_diffusion_space, to_pixel_space
from training.engine import batches, predict
from training.metrics import logistic_cv_accuracy, psnr, roc_auc, roc_curve
from training.train import load_trained

SIGN_NOISE_EPS = 0.015
T_STARS = (50, 100)
DDIM_STEPS = 10


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Per-image statistics that resampling would leave a trace in: ``[N, 6]``.

    Mean, std, foreground fraction, mean gradient magnitude, high-frequency
    energy (Laplacian variance) and the 99th percentile.
    """
    x = images.astype(np.float64)
    gy, gx = np.gradient(x, axis=(1, 2))
    lap = x[:, 1:-1, 1:-1] * 4 - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    flat = x.reshape(len(x), -1)
    return np.stack(
        [flat.mean(1), flat.std(1), (flat > 0.1).mean(1), np.hypot(gx, gy).reshape(len(x), -1).mean(1),
         lap.reshape(len(x), -1).var(1), np.percentile(flat, 99, axis=1)], 1
    )


def size_shortcut(data: Dataset) -> dict:
    """How well size (before) and image statistics (after preprocessing) predict the label, all splits pooled."""
    splits = [data[s] for s in ("train", "val", "test")]
    labels = np.concatenate([s.labels for s in splits])
    out: dict = {"n": int(len(labels))}
    if splits[0].original_sizes is not None:
        sizes = np.concatenate([s.original_sizes for s in splits]).astype(np.float64)
        out["label_from_original_size"] = logistic_cv_accuracy(np.log(sizes), labels)
    stats = image_statistics(np.concatenate([s.images for s in splits]))
    out["label_from_preprocessed_stats"] = logistic_cv_accuracy(stats, labels)
    if "label_from_original_size" in out:
        big = np.log(sizes).sum(1) > 2 * np.log(300)
        out["original_size_from_preprocessed_stats"] = logistic_cv_accuracy(stats, big)
        out["original_size_majority_rate"] = float(max(big.mean(), 1 - big.mean()))
    return out


def classifier_section(run: Path, data: Dataset) -> tuple[dict, object]:
    model, profile, ck = load_trained("classifier", run)
    test = data["test"]
    t0 = time.perf_counter()
    probs = predict(model, test.images).numpy()
    secs = time.perf_counter() - t0
    pred = probs.argmax(1)
    res = {
        "checkpoint_epoch": ck["epoch"],
        "val_acc": ck["metrics"].get("val_acc"),
        "test_acc": float((pred == test.labels).mean()),
        "n_test": int(len(test)),
        "per_class_acc": {c: float((pred[test.labels == i] == i).mean()) for i, c in enumerate(data.class_names)},
        "inference_ms_per_scan": 1000 * secs / len(test),
    }
    if test.original_sizes is not None:
        side = test.original_sizes.max(1)
        bins = {"< 300 px": side < 300, ">= 300 px": side >= 300}
        res["acc_by_original_size"] = {
            f"{k} / {c}": {"n": int((m & (test.labels == i)).sum()), "acc": float((pred[m & (test.labels == i)] == i).mean())}
            for k, m in bins.items() for i, c in enumerate(data.class_names) if (m & (test.labels == i)).sum()
        }
    return res, model


def detector_section(run: Path, data: Dataset, out: Path) -> dict:
    """The defense's detection score (the profile's ``defense.score``: noise floor or the MAE's error)."""
    from training.defense import detection_scores

    profile = cfgmod.load_toml(run / "config.toml")
    mae = load_trained("detector", run)[0] if (run / "detector" / "best.pt").exists() else None
    d = profile.defense

    def scores(images):
        return detection_scores(mae, images, d, profile.detector.mask_ratio, profile.detector.mask_seed)

    test = data["test"]
    g = np.random.default_rng(0)
    noisy = np.clip(test.images + SIGN_NOISE_EPS * g.choice([-1.0, 1.0], size=test.images.shape), 0, 1).astype(np.float32)
    clean_s = scores(test.images)
    noisy_s = scores(noisy)
    auc = roc_auc(clean_s, noisy_s)
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(min(clean_s.min(), noisy_s.min()), max(clean_s.max(), noisy_s.max()), 50)
    ax[0].hist(clean_s, bins, alpha=0.6, label="clean test scans")
    ax[0].hist(noisy_s, bins, alpha=0.6, label=f"+ sign noise, eps {SIGN_NOISE_EPS}")
    ax[0].set_xlabel(f"detection score ({d.score})")
    ax[0].legend()
    fpr, tpr = roc_curve(clean_s, noisy_s)
    ax[1].plot(fpr, tpr)
    ax[1].plot([0, 1], [0, 1], "k:", lw=0.8)
    ax[1].set_xlabel("false positive rate")
    ax[1].set_ylabel("true positive rate")
    ax[1].set_title(f"ROC AUC {auc:.3f}")
    fig.tight_layout()
    fig.savefig(out / "detector_scores.png", dpi=110)
    plt.close(fig)
    tau = float(np.quantile(scores(data["val"].images), 1.0 - d.flag_rate))
    return {
        "score": d.score,
        "flag_rate": d.flag_rate,
        "n_test": int(len(test)),
        "clean_score_mean": float(clean_s.mean()),
        "noisy_score_mean": float(noisy_s.mean()),
        "roc_auc_sign_noise": auc,
        "tau_val": tau,
        "flag_rate_clean_test": float((clean_s > tau).mean()),
        "flag_rate_noisy_test": float((noisy_s > tau).mean()),
    }


def denoiser_section(run: Path, data: Dataset, classifier, out: Path, quick: bool) -> dict:
    model, profile, ck = load_trained("denoiser", run)
    diffusion = GaussianDiffusion.from_config(profile.denoiser)
    test = data["test"]
    n_full = 16 if quick else 64  # full ancestral DDPM costs t* network evaluations per scan
    res: dict = {"checkpoint_epoch": ck["epoch"], "n_test": int(len(test)), "ddim_steps": DDIM_STEPS, "n_full_ddpm": n_full}
    grid_rows = []
    for t_star in T_STARS:
        for steps, n in ((DDIM_STEPS, len(test)), (None, n_full)):
            images, labels = test.images[:n], test.labels[:n]
            g = torch.Generator().manual_seed(t_star)
            purified, seconds = [], 0.0
            with torch.no_grad():
                for x, _ in batches(images, labels, 64, False):
                    t0 = time.perf_counter()
                    purified.append(purify(model, diffusion, x, t_star, steps=steps, generator=g))
                    seconds += time.perf_counter() - t0
            purified = torch.cat(purified)[:, 0].numpy()
            acc = float((predict(classifier, purified).argmax(1).numpy() == labels).mean())
            clean_acc = float((predict(classifier, images).argmax(1).numpy() == labels).mean())
            name = f"t{t_star}_" + (f"ddim{steps}" if steps else "ddpm_full")
            res[name] = {
                "n": int(n), "psnr_db_mean": float(psnr(purified, images).mean()), "acc_purified": acc,
                "acc_clean_same_scans": clean_acc, "seconds_per_scan": seconds / n,
                "denoiser_evals_per_scan": steps or t_star,
            }
            if steps:
                gn = torch.Generator().manual_seed(99)
                x0 = torch.from_numpy(images[:6])[:, None]
                noise = torch.randn(x0.shape, generator=gn)
                t = torch.full((len(x0),), t_star)
                noised = to_pixel_space(diffusion.q_sample(to_diffusion_space(x0), t, noise))[:, 0].numpy()
                grid_rows.append((t_star, images[:6], noised, purified[:6]))
    plt = _plt()
    fig, axes = plt.subplots(3 * len(grid_rows), 6, figsize=(9, 4.8 * len(grid_rows)))
    for r, (t_star, orig, noised, pur) in enumerate(grid_rows):
        for c in range(6):
            for k, (img, title) in enumerate(((orig, "original"), (noised, f"noised t*={t_star}"), (pur, f"purified ({DDIM_STEPS} steps)"))):
                ax = axes[3 * r + k, c]
                ax.imshow(img[c], cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "purification_grid.png", dpi=100)
    plt.close(fig)
    return res


def timing_section(run: Path) -> dict:
    out = {}
    for comp in ("classifier", "detector", "denoiser"):
        hist = run / comp / "history.jsonl"
        if hist.exists():
            rows = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()]
            secs = [r["epoch_seconds"] for r in rows]
            out[comp] = {"epochs": len(rows), "median_epoch_seconds": float(np.median(secs)),
                         "min_epoch_seconds": float(np.min(secs)), "total_seconds": float(np.sum(secs))}
    return out


def write_report(run: str | Path, data_source: str | None = None, out_dir: str | Path | None = None,
                 progress: bool = True, quick: bool = False, command: str = "") -> Path:
    run = Path(run)
    out = Path(out_dir) if out_dir else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    if data_source is None:
        from training.runs import read_source

        data_source = read_source(run)
    _, profile, _ = load_trained("classifier", run)
    data = load_dataset(data_source, profile.preprocess, seed=profile.seed, progress=progress)
    report = {
        "run": str(run),
        "data": data_source,
        "split_digest": data.digest,
        "profile": profile.name,
        "command": command,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()},
    }
    report["size_shortcut"] = size_shortcut(data)
    report["classifier"], classifier = classifier_section(run, data)
    report["detector"] = detector_section(run, data, out)
    report["denoiser"] = denoiser_section(run, data, classifier, out, quick)
    report["wall_time"] = timing_section(run)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = out / "report.md"
    md.write_text(render_markdown(report))
    return md


def render_markdown(r: dict) -> str:
    c, d, u, s = r["classifier"], r["detector"], r["denoiser"], r["size_shortcut"]
    lines = [
        f"# Component report: {r['run']}",
        "",
        f"Data `{r['data']}` (split digest `{r['split_digest'][:16]}`), profile `{r['profile']}`, "
        f"torch {r['machine']['torch']} on {r['machine']['threads']} CPU thread(s).",
        "",
        f"Produced by: `{r['command'] or 'python -m training report --run ' + r['run']}`",
        "",
        "## Classifier (mixture of experts), test split",
        "",
        f"- test accuracy **{100 * c['test_acc']:.2f} %** on {c['n_test']} scans "
        f"(checkpoint of epoch {c['checkpoint_epoch']}, chosen on validation: {100 * (c['val_acc'] or 0):.2f} %)",
        "- per class: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in c["per_class_acc"].items()),
        f"- CPU inference {c['inference_ms_per_scan']:.1f} ms per scan (batch 64)",
    ]
    if "acc_by_original_size" in c:
        lines += ["", *table(["original size / class", "scans", "accuracy"],
                             [(k, v["n"], f"{100 * v['acc']:.2f} %") for k, v in c["acc_by_original_size"].items()])]
    lines += ["", "### Size shortcut (5-fold logistic regression, all splits pooled)", ""]
    if "label_from_original_size" in s:
        lines.append(f"- label from original image size (log h, log w): {100 * s['label_from_original_size']:.1f} %")
        lines.append(f"- original size (>= 300 px a side or not) from preprocessed-image statistics: "
                     f"{100 * s['original_size_from_preprocessed_stats']:.1f} % (majority rate {100 * s['original_size_majority_rate']:.1f} %)")
    lines.append(f"- label from preprocessed-image statistics (mean, std, foreground, gradient, Laplacian variance, p99): "
                 f"{100 * s['label_from_preprocessed_stats']:.1f} %")
    lines += [
        "",
        f"## Detection score ({d['score']}), test split",
        "",
        f"- mean score clean {d['clean_score_mean']:.5f}, with uniform sign noise (L-inf {SIGN_NOISE_EPS}) {d['noisy_score_mean']:.5f}",
        f"- ROC AUC clean vs. noisy: **{d['roc_auc_sign_noise']:.3f}** ({d['n_test']} + {d['n_test']} scans)",
        f"- tau at a {100 * d['flag_rate']:g} % clean flag rate on validation: {d['tau_val']:.5f}; flag rate clean test "
        f"{100 * d['flag_rate_clean_test']:.1f} %, noisy test {100 * d['flag_rate_noisy_test']:.1f} %",
        "",
        "![detector scores](detector_scores.png)",
        "",
        "## Denoiser (DDPM U-Net), purification of clean test scans",
        "",
    ]
    purification = []
    for k, v in u.items():
        if isinstance(v, dict):
            t_star, how = k.split("_", 1)
            purification.append((t_star[1:], how, v["n"], v["denoiser_evals_per_scan"], f"{v['psnr_db_mean']:.2f} dB",
                                 f"{100 * v['acc_purified']:.2f} %", f"{100 * v['acc_clean_same_scans']:.2f} %",
                                 f"{v['seconds_per_scan']:.3f}"))
    lines += table(["t*", "reverse process", "scans", "denoiser evals / scan", "PSNR vs. original", "accuracy purified",
                    "accuracy clean (same scans)", "s / scan"], purification, align="rlrrrrrr")
    lines += ["", "![purification grid](purification_grid.png)", "", "## Wall time per epoch on this machine", ""]
    lines += table(["component", "epochs", "median s / epoch", "fastest epoch s", "total s"],
                   [(k, v["epochs"], f"{v['median_epoch_seconds']:.0f}",
                     f"{v.get('min_epoch_seconds', float('nan')):.0f}", f"{v['total_seconds']:.0f}")
                    for k, v in r["wall_time"].items()])
    lines += ["", "Epoch times include validation; the fastest epoch is the best estimate of an otherwise idle machine "
              "(other jobs shared the CPU during some epochs)."]
    return "\n".join(lines) + "\n"
