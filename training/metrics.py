"""Small, dependency-free metrics."""

from __future__ import annotations

import numpy as np


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve for 'positive scores higher' (Mann-Whitney U, ties counted half)."""
    neg, pos = np.asarray(negatives, np.float64).ravel(), np.asarray(positives, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        raise ValueError("roc_auc needs at least one score of each kind")
    scores = np.concatenate([neg, pos])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def roc_curve(negatives: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0, 0) to (1, 1)."""
    scores = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(len(negatives)), np.ones(len(positives))])
    order = np.argsort(-scores, kind="mergesort")
    tps = np.cumsum(labels[order])
    fps = np.cumsum(1 - labels[order])
    return np.concatenate([[0], fps / len(negatives)]), np.concatenate([[0], tps / len(positives)])


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image of ``[N, ...]`` arrays, in dB."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-12))


def logistic_cv_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0, l2: float = 1e-2) -> float:
    """Cross-validated accuracy of an L2-regularised logistic regression (standardised features, Newton steps)."""
    x = np.asarray(features, np.float64)
    x = x.reshape(len(x), -1)
    y = np.asarray(labels, np.float64)
    idx = np.random.default_rng(seed).permutation(len(y))
    correct = 0
    for k in range(folds):
        test = idx[k::folds]
        train = np.setdiff1d(idx, test)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
        xt = np.c_[np.ones(len(train)), (x[train] - mu) / sd]
        w = np.zeros(xt.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-xt @ w))
            grad = xt.T @ (p - y[train]) + l2 * w
            hess = (xt * (p * (1 - p))[:, None]).T @ xt + l2 * np.eye(len(w))
            w -= np.linalg.solve(hess, grad)
        xs = np.c_[np.ones(len(test)), (x[test] - mu) / sd]
        correct += int(((xs @ w > 0) == (y[test] > 0.5)).sum())
    return correct / len(y)


def balanced_accuracy(labels, preds) -> float:
    """Mean recall over the classes present in ``labels`` (NaN when there are no labels).

    A class absent from ``labels`` has no recall and is left out, so a site
    whose test scans are all of one class is scored on that class alone.
    """
    y, p = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if y.size == 0:
        return float("nan")
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))


def sensitivity(labels, preds, positive: int) -> float:
    """Recall of class ``positive`` (the tumor class); NaN when ``labels`` has no positive."""
    y, p = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} predictions")
    pos = y == positive
    return float((p[pos] == positive).mean()) if pos.any() else float("nan")


def positive_class(class_names) -> int:
    """Index of the tumor class: the name "yes", "tumor" or "tumour" (any case), else the last class."""
    names = [str(c).strip().lower() for c in class_names]
    for i, c in enumerate(names):
        if c in ("yes", "tumor", "tumour"):
            return i
    if not names:
        raise ValueError("no class names")
    return len(names) - 1
