"""A site's bundle on disk: the manifest, verified before anything is loaded.

A bundle is refused, with the offending file named, when its manifest's
signature does not verify against a trusted key (``runtime.signing``), its
schema version is unknown, the manifest has the wrong shape or values no
trained bundle has (tau not finite or out of range, class names that do not
fit, an insane schedule), a file it names is not a plain file inside the
bundle (``..``, an absolute path, a symlink), or a file's sha256 differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from dataclasses import dataclass, field
from pathlib import Path

from runtime.signing import SIG_NAME, SignatureError, Verdict, trusted_keys, verify_manifest

KNOWN_SCHEMAS = (2,)
MAX_MANIFEST_BYTES = 4 << 20
MAX_SCORE = 4.0  # no image in [0, 1] scores above this on the noise floor or the MAE error
HEX = frozenset("0123456789abcdef")


class BundleError(ValueError):
    """A bundle that must not be used; the message names the file and the reason."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_name(name: object) -> bool:
    """A plain file name inside the bundle folder: no separators, no ``..``, nothing absolute or hidden."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and not name.startswith(".")
            and "/" not in name and "\\" not in name and "\x00" not in name and ":" not in name)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_manifest(m: object, where: str) -> None:
    """Refuse a manifest of the wrong shape or with values no trained bundle has (one :class:`BundleError`)."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise BundleError(f"{where}: invalid manifest: {what}")

    need(isinstance(m, dict), f"expected a JSON object, got {type(m).__name__}")
    version = m.get("schema_version")
    if version not in KNOWN_SCHEMAS:
        raise BundleError(f"{where}: schema version {version!r} is not one this runtime knows {KNOWN_SCHEMAS} "
                          "(export the bundle again with this version)")
    for key in ("files", "detector", "purification", "preprocessing", "class_names", "input", "ood"):
        need(key in m, f"no {key!r}")
    files = m["files"]
    need(isinstance(files, dict) and files, "'files' must be a non-empty object")
    for name, meta in files.items():
        need(safe_name(name), f"file name {name!r} is not a plain name inside the bundle")
        need(name not in ("manifest.json", SIG_NAME), f"file name {name!r} is reserved")
        need(isinstance(meta, dict), f"files[{name!r}] must be an object")
        h = meta.get("sha256")
        need(isinstance(h, str) and len(h) == 64 and set(h) <= HEX, f"files[{name!r}] has no valid sha256")
        need(_int(meta.get("bytes")) and meta["bytes"] >= 0, f"files[{name!r}] has no valid byte count")
    names = m["class_names"]
    need(isinstance(names, list) and len(names) >= 2 and all(isinstance(c, str) and c.strip() for c in names)
         and len(set(names)) == len(names), "'class_names' must be two or more distinct non-empty strings")
    inp = m["input"]
    need(isinstance(inp, dict) and isinstance(inp.get("shape"), list) and len(inp["shape"]) == 4, "'input.shape'")
    size = inp["shape"][-1]
    need(_int(size) and 8 <= size <= 2048 and inp["shape"][-2] == size and inp["shape"][1] == 1,
         f"input shape {inp['shape']} is not [N, 1, S, S] with 8 <= S <= 2048")
    pp = m["preprocessing"]
    need(isinstance(pp, dict) and pp.get("size") == size, "'preprocessing.size' must equal the input size")
    need(_finite(pp.get("threshold")) and 0.0 <= pp["threshold"] < 1.0, "'preprocessing.threshold' in [0, 1)")
    need(_finite(pp.get("margin")) and 0.0 <= pp["margin"] <= 0.5, "'preprocessing.margin' in [0, 0.5]")
    need(isinstance(pp.get("normalize"), bool), "'preprocessing.normalize' must be true or false")
    d = m["detector"]
    need(isinstance(d, dict) and isinstance(d.get("calibration"), dict), "'detector' with a 'calibration' object")
    need(_finite(d.get("tau")) and 0.0 <= d["tau"] <= MAX_SCORE,
         f"detector tau {d.get('tau')!r} must be a finite number in [0, {MAX_SCORE}] (above it nothing is flagged)")
    need(d["calibration"].get("rule", "tau") in ("tau", "batch"), "unknown detector rule")
    p = m["purification"]
    need(isinstance(p, dict) and isinstance(p.get("schedule"), dict) and isinstance(p.get("t_star"), dict),
         "'purification' with 'schedule' and 't_star'")
    s, t = p["schedule"], p["t_star"]
    need(s.get("kind") == "linear" and _int(s.get("num_steps")) and 1 <= s["num_steps"] <= 10000,
         "schedule: linear with 1..10000 steps")
    need(_finite(s.get("beta_start")) and _finite(s.get("beta_end")) and 0 < s["beta_start"] < s["beta_end"] < 1,
         "schedule: 0 < beta_start < beta_end < 1")
    need(all(_int(t.get(k)) for k in ("t_min", "t_max", "quantum")) and 1 <= t["t_min"] <= t["t_max"] < s["num_steps"]
         and t["quantum"] >= 1, "t*: integers with 1 <= t_min <= t_max < num_steps and quantum >= 1")
    need(_finite(t.get("ref_ratio")) and t["ref_ratio"] > 1.0, "t*: ref_ratio > 1")
    need(_int(p.get("steps")) and 0 <= p["steps"] <= s["num_steps"], "purification steps in 0..num_steps")
    o = m["ood"]
    need(isinstance(o, dict) and o.get("file") in files, "'ood' must name its graph among the files")
    need(_finite(o.get("threshold")) and o["threshold"] > 0, "'ood.threshold' must be a finite positive number")
    draws = m.get("purification", {}).get("draws", 1)
    need(_int(draws) and 1 <= draws <= 16, "purification draws in 1..16")
    need(m.get("purification", {}).get("mode", "adaptive") in ("adaptive", "always"),
         "purification mode 'adaptive' (the flagged scans) or 'always' (every scan)")


@dataclass
class Bundle:
    path: Path
    manifest: dict
    signature: Verdict = field(default_factory=lambda: Verdict("unsigned"))

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, *, trusted: list[str | Path] | None = None,
             allow_unsigned: bool = False) -> Bundle:
        """Read, signature-check, validate and (``verify``) hash-check a bundle; :class:`BundleError` otherwise.

        The manifest's bytes are read once: the signature is checked on those
        bytes and the same bytes are parsed. ``trusted``: public key files
        trusted besides ``$MEDFEDPURE_HOME/trusted-keys``. ``allow_unsigned``
        accepts an unsigned bundle or one signed by an untrusted key (never a
        broken signature); ``bundle.signature`` says which.
        """
        path = Path(path)
        mf = path / "manifest.json"
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle folder")
        if mf.is_symlink() or (mf.exists() and not mf.is_file()):
            raise BundleError(f"{mf}: not a plain file")
        if not mf.exists():
            raise BundleError(f"{mf}: missing; not a bundle")
        try:
            if mf.stat().st_size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{mf}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a manifest")
            data = mf.read_bytes()
        except OSError as err:
            raise BundleError(f"{mf}: unreadable ({err.strerror})") from None
        try:
            verdict = verify_manifest(path, data, trusted=trusted_keys(trusted), allow_unsigned=allow_unsigned)
        except SignatureError as err:
            raise BundleError(str(err)) from None
        try:
            manifest = json.loads(data, parse_constant=lambda c: float(c))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BundleError(f"{mf}: unreadable ({err})") from None
        validate_manifest(manifest, str(mf))
        bundle = cls(path, manifest, verdict)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        root = self.path.resolve()
        for name, meta in self.manifest["files"].items():
            f = self.path / name
            try:
                st = f.lstat()
            except FileNotFoundError:
                raise BundleError(f"{f}: listed in the manifest but missing") from None
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"{f}: a symlink; every bundle file must be a plain file inside the bundle")
            if not stat.S_ISREG(st.st_mode) or f.resolve().parent != root:
                raise BundleError(f"{f}: not a plain file inside the bundle")
            if st.st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
                raise BundleError(f"{f}: sha256 does not match the manifest (modified or corrupted)")

    def file(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of ``graph`` at ``precision`` (fp32, fp16, or int8: the int8 denoiser with fp32 others).

        The ``ood`` graph (the out-of-distribution score) is fp32 at every
        precision: its threshold was calibrated on fp32 scores.
        """
        if graph == "ood":
            return self.path / self.manifest["ood"]["file"]
        if precision == "int8" and graph != "denoiser":
            precision = "fp32"
        name = f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
        if name not in self.manifest["files"]:
            why = ""
            if precision == "int8":
                rec = self.manifest.get("parity", {}).get("int8")
                why = (f" (its parity check failed at export: {rec.get('reason')})" if rec and not rec.get("passed")
                       else " (exported without it; export again to add it)")
            raise BundleError(f"{self.path}: the bundle has no {name}{why}")
        return self.path / name

    @property
    def precisions(self) -> list[str]:
        """The precisions the bundle's ONNX graphs come in (``int8``: only where the int8 denoiser passed its check)."""
        return list(self.manifest.get("graphs", {}).get("precisions", ["fp32"]))

    @property
    def size(self) -> int:
        return int(self.manifest["input"]["shape"][-1])

    @property
    def preprocess_config(self):
        """The bundle's preprocessing as a :class:`runtime.preprocess.PreprocessConfig`."""
        from runtime.preprocess import PreprocessConfig

        pp = self.manifest["preprocessing"]
        return PreprocessConfig(size=int(pp["size"]), threshold=float(pp["threshold"]), margin=float(pp["margin"]),
                                normalize=bool(pp["normalize"]))

    @property
    def ood_threshold(self) -> float:
        return float(self.manifest["ood"]["threshold"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])
