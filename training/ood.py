"""Is this a brain MRI slice like the ones the site's model was trained on? The out-of-distribution score.

A classifier answers every input with a class, so something must refuse the
inputs it was never trained to read (text, a blank frame, a strip, another
body part or view). The score here is the Mahalanobis distance of the
classifier's shared feature psi(x) (the mean of the experts' pooled backbone
features, what the gates read) from the site's clean training scans:
class-conditional means, one shared covariance (Lee et al., 2018), the
minimum over classes. It needs no extra training and costs one backbone pass.

The threshold is the ``1 - refusal_rate`` quantile of the score on clean
validation scans (a fixed false-refusal rate, 1 % by default). A site alone
has few of them (13-50 per Br35H site) and its Gaussian is fitted on a few
hundred scans in 128 dimensions, so the site-only threshold refused 4.9 % of
clean test scans at a 1 % target. The experts are shared, so psi is the same
function at every site: the federation sums each site's statistics
(:func:`feature_stats`, :func:`add_stats`) and pools the validation scores
(scalars), which refused 1.1 %.
``benchmarks/ood.py`` compares it with the other scores the bundle already
has (max softmax probability, the noise floor, the MAE's error when trained)
on validation scans and synthetic out-of-distribution inputs made by
:func:`synthetic_ood`.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from runtime.preprocess import PreprocessConfig, preprocess

OOD_KINDS = ("text", "white", "noise", "strip", "gradient", "checker", "zoom", "inverted", "shapes", "tiled")


def shared_features(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """psi(x) ``[N, F]``: the mean of the experts' pooled features (a plain timm model: its pre-logits)."""
    if hasattr(classifier, "experts"):
        h = classifier.normalize(x)
        return torch.stack([e.backbone(h) for e in classifier.experts], 1).mean(1)
    if hasattr(classifier, "forward_head"):
        return classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    raise TypeError(f"no shared feature for a {type(classifier).__name__}")


class MahalanobisScore(nn.Module):
    """``image [N, 1, S, S]`` -> ``[N]``: min over classes of (psi - mu_c)^T P (psi - mu_c), P the shared precision."""

    def __init__(self, classifier: nn.Module, means: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("means", means.float())
        # P = L L^T: the squared norm of (psi - mu) L is the distance, with no [N, C, F, F] intermediate.
        self.register_buffer("factor", torch.linalg.cholesky(precision.double()).float())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = shared_features(self.classifier, image)
        d = (f[:, None, :] - self.means[None]) @ self.factor  # [N, C, F]
        return d.pow(2).sum(-1).min(1).values


@torch.no_grad()
def _batched_features(classifier: nn.Module, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    classifier.eval()
    x = torch.as_tensor(images).float()
    if x.dim() == 3:
        x = x[:, None]
    return torch.cat([shared_features(classifier, x[i : i + batch]) for i in range(0, len(x), batch)]).double()


def feature_stats(classifier: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Sufficient statistics of psi on clean scans: per-class counts and sums, and the sum of outer products.

    Statistics of several sites add up (:func:`add_stats`): since the
    experts are shared, psi is the same function at every site, and the sums
    are what a federation round would carry; no scan leaves its site.
    """
    f = _batched_features(classifier, images)
    y = torch.as_tensor(np.asarray(labels)).long()
    n = torch.stack([(y == c).sum() for c in range(num_classes)]).double()
    sums = torch.stack([f[y == c].sum(0) for c in range(num_classes)])
    return {"n": n, "sum": sums, "outer": f.T @ f}


def add_stats(parts: list[dict]) -> dict:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def mahalanobis_from_stats(classifier: nn.Module, stats: dict, shrinkage: float = 0.05) -> MahalanobisScore:
    """Class means and the shared covariance from summed statistics, shrunk towards its diagonal."""
    n, sums, outer = stats["n"], stats["sum"], stats["outer"]
    total = float(n.sum())
    if total < 2:
        raise ValueError("an out-of-distribution score needs at least two clean scans")
    grand = sums.sum(0) / total
    means = torch.stack([sums[c] / n[c] if n[c] > 0 else grand for c in range(len(n))])
    within = outer - sum(n[c] * torch.outer(means[c], means[c]) for c in range(len(n)) if n[c] > 0)
    cov = within / max(total - 1, 1)
    cov = (1 - shrinkage) * cov + shrinkage * torch.diag(torch.diag(cov)) + 1e-6 * torch.eye(len(cov), dtype=cov.dtype)
    return MahalanobisScore(classifier, means, torch.linalg.inv(cov)).eval()


def fit_mahalanobis(classifier: nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int,
                    shrinkage: float = 0.05) -> MahalanobisScore:
    """Class means and a shared covariance of psi on clean (training) scans of one place."""
    return mahalanobis_from_stats(classifier, feature_stats(classifier, images, labels, num_classes), shrinkage)


@torch.no_grad()
def score_images(graph: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    x = torch.as_tensor(images).float()
    if x.dim() == 3:
        x = x[:, None]
    return torch.cat([graph(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def refusal_threshold(clean_scores: np.ndarray, refusal_rate: float) -> float:
    """The score above which ``refusal_rate`` of the given clean scans are refused."""
    s = np.asarray(clean_scores, np.float64)
    if s.size == 0:
        raise ValueError("cannot set an out-of-distribution threshold on zero clean scans")
    return float(np.quantile(s, 1.0 - refusal_rate))


def _raw(kind: str, scan: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One raw (pre-preprocessing) out-of-distribution image in [0, 1] of kind ``kind``, built from clean scans."""
    h = 256
    if kind == "text":
        img = np.zeros((h, h), np.uint8)
        word = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size=int(rng.integers(3, 7))))
        cv2.putText(img, word, (10, 140), cv2.FONT_HERSHEY_SIMPLEX, float(rng.uniform(1.2, 2.0)), 255, 3)
        img = img.astype(np.float32) / 255.0
        return img if rng.random() < 0.5 else 1.0 - img
    if kind == "white":
        return np.full((h, h), float(rng.uniform(0.6, 1.0)), np.float32)
    if kind == "noise":
        return rng.random((h, h)).astype(np.float32)
    if kind == "strip":
        long = int(rng.integers(400, 3000))
        img = rng.random((2, long)).astype(np.float32)
        return img if rng.random() < 0.5 else img.T.copy()
    if kind == "gradient":
        g = np.linspace(0.0, 1.0, h, dtype=np.float32)
        return np.outer(np.ones(h, np.float32), g) if rng.random() < 0.5 else np.outer(g, g)
    if kind == "checker":
        k = int(rng.integers(4, 32))
        yy, xx = np.mgrid[:h, :h]
        return (((yy // k) + (xx // k)) % 2).astype(np.float32)
    if kind == "zoom":  # a quarter of a scan blown up: no whole head in view
        s = scan.shape[0]
        y, x = int(rng.integers(0, s // 2)), int(rng.integers(0, s // 2))
        return cv2.resize(scan[y : y + s // 2, x : x + s // 2], (h, h), interpolation=cv2.INTER_LINEAR)
    if kind == "inverted":  # another contrast: dark tissue on a bright field
        return (1.0 - scan).astype(np.float32)
    if kind == "shapes":  # bright geometric shapes on black, no anatomy
        img = np.zeros((h, h), np.uint8)
        for _ in range(int(rng.integers(2, 6))):
            c = tuple(int(v) for v in rng.integers(30, h - 30, 2))
            level = int(rng.integers(80, 256))
            if rng.random() < 0.5:
                cv2.rectangle(img, c, (c[0] + int(rng.integers(10, 80)), c[1] + int(rng.integers(10, 80))), level, -1)
            else:
                cv2.circle(img, c, int(rng.integers(8, 50)), level, -1)
        return img.astype(np.float32) / 255.0
    if kind == "tiled":  # a 2x2 contact sheet of scans
        top = np.concatenate([scan, other], 1)
        return np.concatenate([top, top[:, ::-1]], 0).astype(np.float32)
    raise ValueError(f"unknown out-of-distribution kind {kind!r}; choose from {OOD_KINDS}")


def synthetic_ood(scans: np.ndarray, per_kind: int, cfg: PreprocessConfig, seed: int = 0,
                  kinds: tuple[str, ...] = OOD_KINDS) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-distribution inputs after the shared preprocessing: (images ``[M, S, S]``, kind index ``[M]``).

    ``scans`` ``[N, H, W]`` in [0, 1] are clean scans of the split the inputs
    are for (validation scans to choose, test scans to report), so no test
    scan reaches a choice. Inputs the preprocessing itself refuses (no head found) never reach a
    model and are left out.
    """
    rng = np.random.default_rng(seed)
    out, kind_idx = [], []
    for k, kind in enumerate(kinds):
        for _ in range(per_kind):
            a, b = rng.integers(0, len(scans), 2)
            raw = np.clip(_raw(kind, scans[a], scans[b], rng), 0.0, 1.0).astype(np.float32)
            try:
                out.append(preprocess(raw, cfg))
            except ValueError:
                continue
            kind_idx.append(k)
    return np.stack(out), np.asarray(kind_idx)


def risk_coverage(scores: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Accuracy of the accepted scans against the share accepted, accepting the lowest scores first."""
    order = np.argsort(scores, kind="mergesort")
    c = np.asarray(correct, bool)[order]
    n = len(c)
    rows = []
    for cov in (1.0, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.5):
        k = max(1, int(round(cov * n)))
        rows.append({"coverage": cov, "accepted": k, "accuracy": float(c[:k].mean())})
    return rows
