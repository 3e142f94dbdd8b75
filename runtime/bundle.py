"""A site's bundle on disk: the manifest, verified before anything is loaded.

A bundle is refused, with the offending file named, when its schema version
is unknown, a file listed in the manifest is missing, or a file's sha256
differs from the manifest's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

KNOWN_SCHEMAS = (1,)


class BundleError(ValueError):
    """A bundle that must not be used; the message names the file and the reason."""


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        mf = path / "manifest.json"
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle folder")
        if not mf.exists():
            raise BundleError(f"{mf}: missing; not a bundle")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BundleError(f"{mf}: unreadable ({err})") from None
        version = manifest.get("schema_version")
        if version not in KNOWN_SCHEMAS:
            raise BundleError(f"{mf}: schema version {version!r} is not one this runtime knows {KNOWN_SCHEMAS}")
        for key in ("files", "detector", "purification", "preprocessing", "class_names", "input"):
            if key not in manifest:
                raise BundleError(f"{mf}: incomplete manifest, no {key!r}")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for name, meta in self.manifest["files"].items():
            f = self.path / name
            if not f.exists():
                raise BundleError(f"{f}: listed in the manifest but missing")
            if sha256(f) != meta["sha256"]:
                raise BundleError(f"{f}: sha256 does not match the manifest (modified or corrupted)")

    def file(self, graph: str, precision: str = "fp32") -> Path:
        """The ONNX file of ``graph`` at ``precision`` (fp32, fp16, or int8: the int8 denoiser with fp32 others)."""
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
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])
