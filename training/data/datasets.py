"""Data sets as in-memory arrays of preprocessed scans, with their split.

Sources:

* a Br35H folder (``split.csv`` with ``path,label,group,split,sha256``): the
  leak-free group split is honoured as given;
* any class-per-folder tree (``ROOT/<class>/*.png|jpg|tif|dcm``): a split is
  made by seed (70/10/20), or read from ``split.csv`` when one is present;
* ``synth[:N]``: the embedded default, synthetic phantoms made in memory.

Preprocessed arrays are cached on disk (keyed by the file list, their split
and the preprocessing settings) because decoding and cropping 3,000 JPEGs
takes a minute on a small machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import runtime.imageio
import runtime.preprocess
from runtime.imageio import ImageReadError, list_images, read_image
from runtime.preprocess import PreprocessConfig, preprocess
from training.data import phantom

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One scan on disk: ``path`` relative to the data root, integer label, near-duplicate group, split."""

    path: str
    label: int
    group: int
    split: str


@dataclass
class Split:
    """Preprocessed scans of one split: ``images [N, S, S]`` float32 in [0, 1], ``labels [N]``."""

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    paths: list[str]
    profiles: np.ndarray | None = None  # scanner profile per scan (synthetic data)
    original_sizes: np.ndarray | None = None  # [N, 2] (h, w) before preprocessing

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    splits: dict[str, Split]
    digest: str  # sha256 over (path, label, group, split) of every record
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]

    def summary(self) -> str:
        rows = [f"{self.name}: digest {self.digest[:12]}"]
        for s, d in self.splits.items():
            counts = np.bincount(d.labels, minlength=len(self.class_names))
            rows.append(f"  {s:5s} {len(d):5d} scans  " + "  ".join(f"{c}={n}" for c, n in zip(self.class_names, counts)))
        if self.skipped:
            rows.append(f"  skipped {len(self.skipped)} unreadable file(s)")
        return "\n".join(rows)


def split_digest(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.path):
        h.update(f"{r.path},{r.label},{r.group},{r.split}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- readers


def read_split_csv(root: Path) -> tuple[list[Record], list[str]]:
    """Records from ``root/split.csv`` (Br35H layout). Class names sorted: ``no`` = 0, ``yes`` = 1."""
    path = root / "split.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"path", "label", "split"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}")
    class_names = sorted({r["label"] for r in rows})
    records = []
    for i, r in enumerate(rows):
        if r["split"] not in SPLITS:
            raise ValueError(f"{path}: row {i + 2} has split {r['split']!r}; expected one of {SPLITS}")
        group = int(r["group"]) if r.get("group", "") != "" else i
        records.append(Record(r["path"], class_names.index(r["label"]), group, r["split"]))
    return records, class_names


def read_class_folders(root: Path, seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> tuple[list[Record], list[str]]:
    """Class-per-folder tree; a stratified split by ``seed`` (each file its own group)."""
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_names) < 2:
        raise ValueError(f"{root}: expected one sub-folder per class (at least two), found {class_names}")
    rng = np.random.default_rng(seed)
    records = []
    for label, name in enumerate(class_names):
        files = [p.relative_to(root).as_posix() for p in list_images(root / name)]
        if not files:
            raise ValueError(f"{root / name}: no image files")
        order = rng.permutation(len(files))
        n_train = int(round(fractions[0] * len(files)))
        n_val = int(round(fractions[1] * len(files)))
        for rank, i in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            records.append(Record(files[i], label, -1, split))
    records.sort(key=lambda r: r.path)
    return [Record(r.path, r.label, i, r.split) for i, r in enumerate(records)], class_names


# --------------------------------------------------------------------------- loading


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDFEDPURE_CACHE", Path.home() / ".cache" / "medfedpure"))


def _read_one(root: Path, rel: str, cfg: PreprocessConfig):
    """Decode and preprocess one file (OpenCV releases the GIL, so threads scale)."""
    img = read_image(root / rel)
    return preprocess(img, cfg), img.shape


def load_folder(
    root: str | Path,
    cfg: PreprocessConfig,
    *,
    seed: int = 0,
    skip_bad: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Read and preprocess a Br35H-style or class-per-folder data set."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "split.csv").exists():
        records, class_names = read_split_csv(root)
    else:
        records, class_names = read_class_folders(root, seed)
    digest = split_digest(records)
    code = b"".join(Path(m.__file__).read_bytes() for m in (runtime.imageio, runtime.preprocess))
    key = hashlib.sha256(digest.encode() + json.dumps(asdict(cfg), sort_keys=True).encode() + code + str(skip_bad).encode())
    key = key.hexdigest()[:24]
    cache_file = _cache_dir() / f"{root.name}-{key}.npz"
    if cache and cache_file.exists():
        z = np.load(cache_file, allow_pickle=False)
        images, sizes, ok = z["images"], z["sizes"], z["ok"]
        skipped = [tuple(s.split("\t", 1)) for s in z["skipped"].tolist()]
    else:
        images = np.zeros((len(records), cfg.size, cfg.size), np.float32)
        sizes = np.zeros((len(records), 2), np.int64)
        ok = np.ones(len(records), bool)
        skipped = []
        workers = max(1, min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(_read_one, root, r.path, cfg) for r in records]
            for i, fut in enumerate(tqdm(futures, desc=f"preprocess {root.name}", disable=not progress, unit="scan")):
                try:
                    img, shape = fut.result()
                except ImageReadError as err:
                    if not skip_bad:
                        for f in futures:
                            f.cancel()
                        raise
                    ok[i] = False
                    skipped.append((records[i].path, err.reason))
                    continue
                images[i], sizes[i] = img, shape[:2]
        if cache:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, sizes=sizes, ok=ok, skipped=np.array([f"{p}\t{r}" for p, r in skipped], dtype=str))
            os.replace(tmp, cache_file)
    if skipped and progress:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for p, reason in skipped:
            print(f"  {p}: {reason}")
    splits = {}
    for s in SPLITS:
        idx = np.array([i for i, r in enumerate(records) if r.split == s and ok[i]], dtype=np.int64)
        splits[s] = Split(
            images=images[idx],
            labels=np.array([records[i].label for i in idx], dtype=np.int64),
            groups=np.array([records[i].group for i in idx], dtype=np.int64),
            paths=[records[i].path for i in idx],
            original_sizes=sizes[idx],
        )
    return Dataset(root.name, class_names, splits, digest, skipped)


def load_synthetic(n: int, cfg: PreprocessConfig, seed: int = 0, profiles=("A", "B", "C", "D")) -> Dataset:
    """The embedded default: ``n`` phantoms (half with a tumor), spread over scanner ``profiles``, split 70/10/20."""
    per = [n // len(profiles) + (i < n % len(profiles)) for i in range(len(profiles))]
    xs, ys, ps = [], [], []
    for i, (prof, k) in enumerate(zip(profiles, per)):
        x, y = phantom.generate(k, size=cfg.size, seed=seed * 1000 + i, profile=prof)
        xs.append(x)
        ys.append(y)
        ps.append(np.full(k, i))
    images, labels, profs = np.concatenate(xs), np.concatenate(ys), np.concatenate(ps)
    order = np.random.default_rng(seed).permutation(n)
    cut = [int(0.7 * n), int(0.8 * n)]
    names = np.array(SPLITS)[np.searchsorted(cut, np.arange(n), side="right")]
    records = [Record(f"synth/{profiles[profs[i]]}_{i:06d}", int(labels[i]), int(i), str(names[r])) for r, i in enumerate(order)]
    splits = {}
    for s in SPLITS:
        idx = np.array([i for r, i in enumerate(order) if names[r] == s], dtype=np.int64)
        splits[s] = Split(images[idx], labels[idx], idx.copy(), [f"synth/{i}" for i in idx], profiles=profs[idx])
    return Dataset(f"synth-{n}", ["no", "yes"], splits, split_digest(records))


def load_dataset(source: str, cfg: PreprocessConfig, *, seed: int = 0, skip_bad: bool = False, progress: bool = True) -> Dataset:
    """``synth`` / ``synth:N`` or a folder path."""
    if source == "synth" or source.startswith("synth:"):
        n = int(source.split(":", 1)[1]) if ":" in source else 600
        return load_synthetic(n, cfg, seed)
    return load_folder(source, cfg, seed=seed, skip_bad=skip_bad, progress=progress)
