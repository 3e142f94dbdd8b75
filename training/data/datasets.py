"""Data sets as in-memory arrays of preprocessed scans, with their split.

Sources:

* a Br35H folder (``split.csv`` with ``path,label,group,split,sha256``): the
  leak-free group split is honoured as given;
* any class-per-folder tree (``ROOT/<class>/*.png|jpg|tif|dcm``): a split is
  made by seed (70/10/20), or read from ``split.csv`` when one is present;
* ``synth[:N]``: the embedded default, synthetic phantoms made in memory.

Preprocessed arrays are cached on disk because decoding and cropping 3,000
JPEGs takes a minute on a small machine. An entry is keyed by the SHA-256 of
every source file's bytes (hashing 3,000 JPEGs takes about a second), the
records (path, label, group, split), the class names, the preprocessing
settings and code, and the cache format, so a file changed in place is read
again whatever its size and time stamp. The folder (``~/.cache/medfedpure``,
``MEDFEDPURE_CACHE`` moves it) is private to the user (mode 0700, files
0600); ``cache=False`` or ``MEDFEDPURE_NO_CACHE=1`` neither reads nor writes it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import stat
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import runtime.imageio
import runtime.preprocess
from runtime.imageio import ImageReadError, list_images, read_image
from runtime.preprocess import PreprocessConfig, preprocess
from training.config import UsageError
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
        raise UsageError(f"{path}: missing column(s) {sorted(missing)}")
    class_names = sorted({r["label"] for r in rows})
    records = []
    for i, r in enumerate(rows):
        if r["split"] not in SPLITS:
            raise UsageError(f"{path}: row {i + 2} has split {r['split']!r}; expected one of {SPLITS}")
        group = int(r["group"]) if r.get("group", "") != "" else i
        records.append(Record(r["path"], class_names.index(r["label"]), group, r["split"]))
    return records, class_names


def read_class_folders(root: Path, seed: int = 0, fractions=(0.7, 0.1, 0.2)) -> tuple[list[Record], list[str]]:
    """Class-per-folder tree; a stratified split by ``seed`` (each file its own group)."""
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_names) < 2:
        raise UsageError(f"{root}: expected one sub-folder per class (at least two), found {class_names}")
    rng = np.random.default_rng(seed)
    records = []
    for label, name in enumerate(class_names):
        files = [p.relative_to(root).as_posix() for p in list_images(root / name)]
        if not files:
            raise UsageError(f"{root / name}: no image files")
        order = rng.permutation(len(files))
        n_train = int(round(fractions[0] * len(files)))
        n_val = int(round(fractions[1] * len(files)))
        for rank, i in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            records.append(Record(files[i], label, -1, split))
    records.sort(key=lambda r: r.path)
    return [Record(r.path, r.label, i, r.split) for i, r in enumerate(records)], class_names


# --------------------------------------------------------------------------- loading


CACHE_FORMAT = 2  # bump when the key or the stored arrays change


def _cache_dir() -> Path:
    return Path(os.environ.get("MEDFEDPURE_CACHE", Path.home() / ".cache" / "medfedpure"))


def cache_disabled() -> bool:
    """True when ``MEDFEDPURE_NO_CACHE`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get("MEDFEDPURE_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no")


def _private_cache_dir() -> Path | None:
    """The cache folder, created with mode 0700 (an existing one is tightened, its ``*.npz`` entries made 0600).

    None, with a warning, when it cannot be made private: not ours, or not a folder.
    """
    path = _cache_dir()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(f"{path} is not a folder")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise PermissionError(f"{path} belongs to another user")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(path, 0o700)
            for entry in os.scandir(path):
                if (entry.name.endswith(".npz") and entry.is_file(follow_symlinks=False)
                        and stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) & 0o077):
                    os.chmod(entry.path, 0o600)
    except OSError as err:
        print(f"warning: preprocessing cache off ({err})", file=sys.stderr)
        return None
    return path


def _file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes; a marker naming the error for a file that cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    except OSError as err:
        return f"unreadable:{err.errno}"
    return h.hexdigest()


def content_hashes(root: Path, records: list[Record]) -> list[str]:
    """SHA-256 of every record's file, in the records' order (hashlib releases the GIL, so threads scale)."""
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_file_sha256, [root / r.path for r in records]))


def cache_key(records: list[Record], hashes: list[str], class_names: list[str], cfg: PreprocessConfig,
              skip_bad: bool) -> str:
    """Hex SHA-256 over everything the cached arrays depend on (see the module's docstring)."""
    h = hashlib.sha256()
    head = {"format": CACHE_FORMAT, "class_names": list(class_names), "preprocess": asdict(cfg), "skip_bad": bool(skip_bad)}
    h.update(json.dumps(head, sort_keys=True).encode() + b"\n")
    for m in (runtime.imageio, runtime.preprocess):
        h.update(hashlib.sha256(Path(m.__file__).read_bytes()).digest())
    for r, digest in zip(records, hashes, strict=True):
        h.update(json.dumps([r.path, r.label, r.group, r.split, digest]).encode() + b"\n")
    return h.hexdigest()


def _cache_read(path: Path, key: str, n: int, size: int):
    """(images, sizes, ok, skipped) of an entry written for ``key`` with ``n`` scans, or None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            images, sizes, ok, skipped = z["images"], z["sizes"], z["ok"], z["skipped"].tolist()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        print(f"warning: ignoring unreadable cache entry {path} ({err})", file=sys.stderr)
        return None
    if images.shape != (n, size, size) or sizes.shape != (n, 2) or ok.shape != (n,):
        return None
    return images, sizes, ok, [tuple(s.split("\t", 1)) for s in skipped]


def _cache_write(path: Path, key: str, images, sizes, ok, skipped) -> None:
    """Write an entry atomically: a 0600 temporary file (mkstemp) in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, key=np.array(key), images=images, sizes=sizes, ok=ok,
                     skipped=np.array([f"{p}\t{r}" for p, r in skipped], dtype=str))
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(err, OSError):
            raise
        print(f"warning: preprocessed scans not cached ({err})", file=sys.stderr)


def _read_one(root: Path, rel: str, cfg: PreprocessConfig):
    """Decode and preprocess one file (OpenCV releases the GIL, so threads scale)."""
    img = read_image(root / rel)
    return preprocess(img, cfg), img.shape


def _preprocess_all(root: Path, records: list[Record], cfg: PreprocessConfig, skip_bad: bool, progress: bool):
    """(images ``[N, S, S]``, original sizes ``[N, 2]``, readable ``[N]``, skipped (path, reason)) of ``records``."""
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
    return images, sizes, ok, skipped


def _split_arrays(records: list[Record], images: np.ndarray, sizes: np.ndarray, ok: np.ndarray) -> dict[str, Split]:
    """The readable scans of every split."""
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
    return splits


def load_folder(
    root: str | Path,
    cfg: PreprocessConfig,
    *,
    seed: int = 0,
    skip_bad: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> Dataset:
    """Read and preprocess a Br35H-style or class-per-folder data set.

    ``cache``: look the preprocessed arrays up in (and add them to) the on-disk cache, unless
    ``MEDFEDPURE_NO_CACHE`` is set; see the module's docstring for what an entry is keyed by.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if (root / "split.csv").exists():
        records, class_names = read_split_csv(root)
    else:
        records, class_names = read_class_folders(root, seed)
    digest = split_digest(records)
    cache_dir = _private_cache_dir() if cache and not cache_disabled() else None
    hit = None
    if cache_dir is not None:
        key = cache_key(records, content_hashes(root, records), class_names, cfg, skip_bad)
        cache_file = cache_dir / f"{root.name}-{key[:32]}.npz"
        hit = _cache_read(cache_file, key, len(records), cfg.size)
    if hit is not None:
        images, sizes, ok, skipped = hit
    else:
        images, sizes, ok, skipped = _preprocess_all(root, records, cfg, skip_bad, progress)
        # stored only if no file changed while it was read, so an entry holds the pixels of the bytes in its key
        if cache_dir is not None and cache_key(records, content_hashes(root, records), class_names, cfg, skip_bad) == key:
            _cache_write(cache_file, key, images, sizes, ok, skipped)
    if skipped and progress:
        print(f"skipped {len(skipped)} unreadable file(s):")
        for p, reason in skipped:
            print(f"  {p}: {reason}")
    return Dataset(root.name, class_names, _split_arrays(records, images, sizes, ok), digest, skipped)


def synthetic_render_size(size: int) -> int:
    """Side of the phantoms as 'acquired' (the files a scanner would write) for models that see ``size``."""
    return 2 * size


def _synthetic_blocks(n: int, profiles) -> list[int]:
    return [n // len(profiles) + (i < n % len(profiles)) for i in range(len(profiles))]


def synthetic_originals(n: int, size: int, indices, seed: int = 0,
                        profiles=("A", "B", "C", "D")) -> tuple[list[np.ndarray], np.ndarray]:
    """Phantoms ``indices`` of ``synth:n`` as acquired (``synthetic_render_size(size)`` pixels, before the
    preprocessing every scan gets) and their labels: what the files of those scans hold."""
    per = _synthetic_blocks(n, profiles)
    starts = np.cumsum([0, *per])
    block_labels = [phantom.make_labels(k, seed * 1000 + b) for b, k in enumerate(per)]
    side = synthetic_render_size(size)
    images, labels = [], []
    for i in np.asarray(indices, dtype=np.int64):
        b = int(np.searchsorted(starts, i, side="right") - 1)
        j = int(i - starts[b])
        block_seed = seed * 1000 + b
        y = int(block_labels[b][j])
        images.append(phantom.make_phantom(phantom.image_rng(block_seed, j), side, bool(y),
                                           phantom.as_profile(profiles[b])))
        labels.append(y)
    return images, np.asarray(labels, dtype=np.int64)


def _synthetic_images(n: int, cfg: PreprocessConfig, seed: int, profiles: tuple, cache: bool) -> np.ndarray:
    """The rendered and preprocessed phantoms ``[n, S, S]``, in generation order; cached like a folder's scans
    (every process of a simulated federation reads them instead of rendering them again)."""
    cache_dir = _private_cache_dir() if cache and not cache_disabled() else None
    if cache_dir is not None:
        h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "synth": n, "seed": seed, "profiles": list(profiles),
                                       "preprocess": asdict(cfg)}, sort_keys=True).encode())
        for m in (phantom, runtime.preprocess):
            h.update(hashlib.sha256(Path(m.__file__).read_bytes()).digest())
        h.update(hashlib.sha256(Path(__file__).read_bytes()).digest())
        key = h.hexdigest()
        cache_file = cache_dir / f"synth-{n}-{key[:32]}.npz"
        hit = _cache_read(cache_file, key, n, cfg.size)
        if hit is not None:
            return hit[0]
    side = synthetic_render_size(cfg.size)
    images = np.empty((n, cfg.size, cfg.size), np.float32)
    start = 0
    for i, (prof, k) in enumerate(zip(profiles, _synthetic_blocks(n, profiles))):
        x, _ = phantom.generate(k, size=side, seed=seed * 1000 + i, profile=prof)
        for j, img in enumerate(x):
            images[start + j] = preprocess(img, cfg)
        start += k
    if cache_dir is not None:
        _cache_write(cache_file, key, images, np.zeros((n, 2), np.int64), np.ones(n, bool), [])
    return images


def load_synthetic(n: int, cfg: PreprocessConfig, seed: int = 0, profiles=("A", "B", "C", "D"),
                   cache: bool = True) -> Dataset:
    """The embedded default: ``n`` phantoms (half with a tumor), spread over scanner ``profiles``, split 70/10/20.

    Each phantom is rendered at :func:`synthetic_render_size` and then goes through the same
    :func:`preprocess` as a scan file does, so a model trained on them reads phantom files written to disk
    (``synthetic_originals``) exactly as it read its training scans.
    """
    per = _synthetic_blocks(n, profiles)
    labels = np.concatenate([phantom.make_labels(k, seed * 1000 + i) for i, k in enumerate(per)])
    profs = np.concatenate([np.full(k, i) for i, k in enumerate(per)])
    images = _synthetic_images(n, cfg, seed, tuple(profiles), cache)
    order = np.random.default_rng(seed).permutation(n)
    cut = [int(0.7 * n), int(0.8 * n)]
    names = np.array(SPLITS)[np.searchsorted(cut, np.arange(n), side="right")]
    records = [Record(f"synth/{profiles[profs[i]]}_{i:06d}", int(labels[i]), int(i), str(names[r])) for r, i in enumerate(order)]
    splits = {}
    for s in SPLITS:
        idx = np.array([i for r, i in enumerate(order) if names[r] == s], dtype=np.int64)
        splits[s] = Split(images[idx], labels[idx], idx.copy(), [f"synth/{i}" for i in idx], profiles=profs[idx])
    return Dataset(f"synth-{n}", ["no", "yes"], splits, split_digest(records))


def load_dataset(source: str, cfg: PreprocessConfig, *, seed: int = 0, skip_bad: bool = False, cache: bool = True,
                 progress: bool = True) -> Dataset:
    """``synth`` / ``synth:N`` or a folder path; ``cache=False``: no preprocessing cache."""
    if source == "synth" or source.startswith("synth:"):
        n = int(source.split(":", 1)[1]) if ":" in source else 600
        return load_synthetic(n, cfg, seed, cache=cache)
    return load_folder(source, cfg, seed=seed, skip_bad=skip_bad, cache=cache, progress=progress)
