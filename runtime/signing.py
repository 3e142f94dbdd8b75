"""Ed25519 signatures on a bundle's manifest, and the keys that make and check them.

A bundle's ``manifest.json`` names every model file with its sha256; its
signature, ``manifest.sig``, covers the exact bytes of ``manifest.json``. So
one verified signature covers the whole bundle: the manifest cannot change
without the signature failing, and no file can change without its sha256
failing.

Keys live under ``$MEDFEDPURE_HOME`` (default ``~/.config/medfedpure``):

    signing/ed25519.key        this machine's private key (0600), made on first use
    signing/ed25519.pub        its public key, the file to hand to the sites
    trusted-keys/*.pub         public keys whose bundles this machine's runtime accepts

A key is named by its id: the first 16 hex digits of the sha256 of its raw
32-byte public key. ``runtime keygen`` makes a site's pair; ``runtime
calibrate`` re-signs with it.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

SIG_NAME = "manifest.sig"
ALGORITHM = "ed25519"


class SignatureError(ValueError):
    """A signature or key that must not be accepted; the message says which and why."""


def home() -> Path:
    return Path(os.environ.get("MEDFEDPURE_HOME") or Path.home() / ".config" / "medfedpure")


def default_signing_key() -> Path:
    return home() / "signing" / "ed25519.key"


def trusted_dir() -> Path:
    return home() / "trusted-keys"


def _raw_public(pub) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def generate_key(path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 pair: ``path`` (PEM private key, 0600) and ``path`` with suffix ``.pub`` (PEM public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    pub_path = path.with_suffix(".pub")
    if path.exists() and not overwrite:
        raise SignatureError(f"{path} exists; a signing key is never overwritten (choose another path)")
    key = Ed25519PrivateKey.generate()
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub_path


def signing_key_path(explicit: str | Path | None, log, made: str = "this machine's signing key") -> Path:
    """The private key to sign with: ``explicit``, or this machine's default key (made on first use); checked readable.

    A missing ``explicit`` key is an error, never made silently.
    """
    key_path = Path(explicit) if explicit else default_signing_key()
    if not key_path.exists():
        if explicit:
            raise SignatureError(f"{key_path}: no such signing key (make one with `runtime keygen --out {key_path}`)")
        _, pub = generate_key(key_path)
        log(f"made {made} {key_path}; sites trust what it signs with its public key {pub}")
    load_private(key_path)  # fail now, not after the work that precedes signing
    return key_path


def load_private(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the signing key ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return key


def load_public(path: str | Path) -> bytes:
    """Raw 32-byte public key from a PEM public key file (or a PEM private key, whose public half is taken)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the key ({err.strerror})") from None
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None)
            key = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not a PEM key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return _raw_public(key)


def trusted_keys(extra: list[str | Path] | None = None) -> dict[str, tuple[bytes, str]]:
    """``{key id: (raw public key, where it came from)}``: ``extra`` files, then ``trusted-keys/*.pub``."""
    keys: dict[str, tuple[bytes, str]] = {}
    for p in extra or []:
        raw = load_public(p)
        keys.setdefault(key_id(raw), (raw, str(p)))
    d = trusted_dir()
    if d.is_dir():
        for p in sorted(d.glob("*.pub")):
            try:
                raw = load_public(p)
            except SignatureError:
                continue  # a stray file in the folder does not make every bundle fail
            keys.setdefault(key_id(raw), (raw, str(p)))
    return keys


def sign_manifest(bundle_dir: str | Path, key_path: str | Path, *, signer: str, role: str) -> dict:
    """Sign ``bundle_dir/manifest.json``'s bytes with the private key at ``key_path``; writes ``manifest.sig``."""
    bundle_dir = Path(bundle_dir)
    key = load_private(key_path)
    data = (bundle_dir / "manifest.json").read_bytes()
    raw = _raw_public(key.public_key())
    sig = {
        "algorithm": ALGORITHM,
        "key_id": key_id(raw),
        "public_key": base64.b64encode(raw).decode(),
        "signer": signer,
        "role": role,
        "signed": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "signature": base64.b64encode(key.sign(data)).decode(),
    }
    (bundle_dir / SIG_NAME).write_text(json.dumps(sig, indent=1) + "\n")
    return sig


@dataclass(frozen=True)
class Verdict:
    """What the signature check found: ``status`` is ``"verified"`` or ``"unsigned"`` / ``"untrusted"`` (allowed)."""

    status: str
    key_id: str | None = None
    signer: str | None = None
    role: str | None = None
    signed: str | None = None
    trusted_as: str | None = None

    def describe(self) -> str:
        if self.status == "verified":
            return (f"signed by {self.signer!r} ({self.role}, key {self.key_id}, trusted via {self.trusted_as}) "
                    f"at {self.signed}")
        return f"NOT VERIFIED ({self.status}; accepted because of --allow-unsigned)"

    def record(self) -> str:
        return f"verified:{self.key_id}" if self.status == "verified" else f"unverified:{self.status}"


def verify_manifest(bundle_dir: str | Path, manifest_bytes: bytes, *, trusted: dict[str, tuple[bytes, str]],
                    allow_unsigned: bool = False) -> Verdict:
    """Check ``manifest.sig`` against ``manifest_bytes`` and a trusted key; raises :class:`SignatureError`.

    A forged or corrupt signature, or one that does not cover these manifest
    bytes, is refused even with ``allow_unsigned``: that option accepts only
    a bundle with no signature or one by a key this machine does not trust.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    bundle_dir = Path(bundle_dir)
    sig_path = bundle_dir / SIG_NAME
    if not sig_path.exists() and not sig_path.is_symlink():
        if allow_unsigned:
            return Verdict("unsigned")
        raise SignatureError(f"{sig_path}: missing; the bundle is unsigned (sign it at export, or pass "
                             "--allow-unsigned to run it anyway, which every result will state)")
    if sig_path.is_symlink() or not sig_path.is_file():
        raise SignatureError(f"{sig_path}: not a plain file")
    try:
        sig = json.loads(sig_path.read_text())
        if not isinstance(sig, dict):
            raise TypeError("not a JSON object")
        raw = base64.b64decode(sig["public_key"], validate=True)
        signature = base64.b64decode(sig["signature"], validate=True)
        if sig.get("algorithm") != ALGORITHM or len(raw) != 32:
            raise ValueError(f"algorithm {sig.get('algorithm')!r}, key of {len(raw)} bytes")
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise SignatureError(f"{sig_path}: malformed signature file ({type(err).__name__}: {err})") from None
    kid = key_id(raw)
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"{bundle_dir / 'manifest.json'}: the signature by key {kid} does not match the "
                             "manifest (the manifest was modified after signing)") from None
    verdict = dict(key_id=kid, signer=str(sig.get("signer")), role=str(sig.get("role")), signed=str(sig.get("signed")))
    if kid in trusted and trusted[kid][0] == raw:
        return Verdict("verified", trusted_as=trusted[kid][1], **verdict)
    if allow_unsigned:
        return Verdict("untrusted", **verdict)
    where = f"--trusted-key FILE or a .pub file in {trusted_dir()}"
    raise SignatureError(f"{sig_path}: signed by key {kid} ({sig.get('signer')!r}), which this machine does not "
                         f"trust ({len(trusted)} trusted key(s)); trust its public key with {where}")
