"""Key material for a real federation: TLS for the SuperLink, authentication keys for the sites.

``python -m training certs --out certs --sites 3 --host fl.example.org`` writes::

    certs/ca/ca.crt  ca.key            the federation's certificate authority (keep ca.key offline)
    certs/superlink/ca.crt  server.crt  server.key
                                       flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile
    certs/sites/site-<k>/ca.crt  auth.key  auth.pub
                                       flower-supernode --root-certificates ca.crt
                                                        --auth-supernode-private-key auth.key;
                                       auth.pub is registered at the SuperLink with
                                       ``flwr supernode register auth.pub <connection>``

TLS: a self-signed CA (ECDSA P-384) signs the SuperLink's server certificate,
whose subject alternative names are the host names / IP addresses the sites
and the operator use to reach it (``--host``, repeatable) plus ``localhost``,
``127.0.0.1`` and ``::1``: the SuperLink's own SuperExec, which starts the
ServerApp, connects to it on loopback over TLS too. Clients verify the
SuperLink against ``ca.crt``; there are no client certificates (Flower does
not use mutual TLS).

Site authentication (``flower-superlink --enable-supernode-auth``): every
SuperNode has an elliptic-curve key pair on a NIST curve (here P-384). The
private key is read by ``flower-supernode --auth-supernode-private-key`` in
OpenSSH format; the public key, in OpenSSH format
(``ecdsa-sha2-nistp384 AAAA...``), is registered at the SuperLink with
``flwr supernode register``. A SuperNode whose public key is not registered
cannot activate and exits. A site may instead make its own pair
(``ssh-keygen -t ecdsa -b 384 -N "" -f auth.key``) and send only ``auth.pub``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from training.config import UsageError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
SUPERLINK_PORT = 8000  # flower-superlink's default --port (Fleet, Control and Runtime API on one HTTPS port)
CURVE = ec.SECP384R1


@dataclass
class SiteKeys:
    """One site's files: its authentication key pair and the CA that vouches for the SuperLink."""

    name: str
    folder: Path
    ca_cert: Path
    private_key: Path
    public_key: Path


@dataclass
class Federation:
    """Every file :func:`create_federation` wrote."""

    out: Path
    ca_cert: Path
    ca_key: Path
    superlink_ca_cert: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    sites: list[SiteKeys] = field(default_factory=list)


# --------------------------------------------------------------------------- building blocks


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts) -> tuple[str, ...]:
    out: list[str] = []
    for h in hosts:
        h = str(h).strip()
        if h.startswith("[") and h.endswith("]"):  # [::1] -> ::1
            h = h[1:-1]
        if not h or any(c.isspace() for c in h) or "/" in h or h.count(":") == 1:
            raise UsageError(f"not a host name or IP address: {h!r} (give it without scheme or port)")
        if h not in out:
            out.append(h)
    if not out:
        raise UsageError("give at least one host name or IP address for the SuperLink certificate")
    return tuple(out)


def make_ca(days: int, name: str = "MedFedPure federation CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate (may sign server certificates, not further CAs)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: tuple[str, ...],
                     days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate, signed by the CA, valid for ``hosts``."""
    hosts = _check_hosts(hosts)
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_auth_keys() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: (OpenSSH private key, OpenSSH public key line)."""
    key = _new_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


# --------------------------------------------------------------------------- the whole federation


def create_federation(out: str | Path, sites: int = 2, hosts=(), days: int = 825,
                      ca_days: int = 3650, force: bool = False) -> Federation:
    """Write a CA, the SuperLink's certificate and ``sites`` site key pairs under ``out``.

    The certificate is valid for ``hosts`` and always for ``localhost``, ``127.0.0.1`` and ``::1``.
    """
    out = Path(out)
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise UsageError(f"--sites must be a whole number >= 1, got {sites!r}")
    if days < 1 or ca_days < 1:
        raise UsageError("certificate lifetimes (--days, --ca-days) must be >= 1 day")
    hosts = _check_hosts((*hosts, *DEFAULT_HOSTS))
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty; choose a new --out, or pass --force to overwrite the keys in it")

    ca_key, ca_cert = make_ca(ca_days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts, min(days, ca_days))
    ca_pem = _pem_cert(ca_cert)
    fed = Federation(
        out=out,
        ca_cert=_write(out / "ca" / "ca.crt", ca_pem),
        ca_key=_write(out / "ca" / "ca.key", _pem_key(ca_key), private=True),
        superlink_ca_cert=_write(out / "superlink" / "ca.crt", ca_pem),
        server_cert=_write(out / "superlink" / "server.crt", _pem_cert(server_cert)),
        server_key=_write(out / "superlink" / "server.key", _pem_key(server_key), private=True),
        hosts=hosts,
    )
    for k in range(1, sites + 1):
        name = f"site-{k}"
        folder = out / "sites" / name
        private, public = make_auth_keys()
        fed.sites.append(SiteKeys(
            name=name, folder=folder,
            ca_cert=_write(folder / "ca.crt", ca_pem),
            private_key=_write(folder / "auth.key", private, private=True),
            public_key=_write(folder / "auth.pub", public),
        ))
    return fed


def describe(fed: Federation, address: str | None = None) -> str:
    """What was written, and which file goes to which process."""
    host = fed.hosts[0]
    address = address or (f"[{host}]:{SUPERLINK_PORT}" if ":" in host else f"{host}:{SUPERLINK_PORT}")
    sl = fed.server_cert.parent.resolve()
    lines = [
        f"wrote the federation's keys to {fed.out}",
        "",
        f"certificate authority: {fed.ca_cert}  (keep {fed.ca_key} offline; it is only needed to issue certificates)",
        f"SuperLink certificate for: {', '.join(fed.hosts)}",
        "",
        "1. on the SuperLink machine (copy the superlink/ folder there):",
        f"     flower-superlink --host 0.0.0.0 --port {address.rsplit(':', 1)[1]} "
        f"--ssl-ca-certfile {sl / 'ca.crt'} --ssl-certfile {sl / 'server.crt'} --ssl-keyfile {sl / 'server.key'} \\",
        "       --enable-supernode-auth --disable-runtime-dependency-installation --database state.db",
        "",
        "2. where you run the flwr command, register every site's public key (once):",
    ]
    for s in fed.sites:
        lines.append(f"     flwr supernode register {s.public_key.resolve()} <connection> --name {s.name}")
    lines += ["", "3. at each site (give site-<k> its own folder: ca.crt, auth.key; never share auth.key):"]
    for s in fed.sites:
        f = s.folder.resolve()
        lines.append(f"     {s.name}: flower-supernode --superlink {address} --root-certificates {f / 'ca.crt'} "
                     f"--auth-supernode-private-key {f / 'auth.key'} \\")
        lines.append("         --node-config \"data-dir='/path/to/scans' state-dir='/path/to/state'\"")
    lines += ["", "See docs/deployment.md for the whole procedure."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``certs`` on a ``python -m training`` sub-parser set."""
    p = subparsers.add_parser("certs", help="create the CA, the SuperLink TLS certificate and site authentication keys",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write (must be new or empty unless --force)")
    p.add_argument("--sites", type=int, default=2, help="number of site key pairs (site-1 ... site-N)")
    p.add_argument("--host", action="append", dest="hosts", metavar="NAME",
                   help="host name or IP address the sites reach the SuperLink at (repeat); "
                        f"{', '.join(DEFAULT_HOSTS)} are always included")
    p.add_argument("--days", type=int, default=825, help="lifetime of the SuperLink certificate in days")
    p.add_argument("--ca-days", type=int, default=3650, help="lifetime of the CA certificate in days")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing files there")
    p.set_defaults(func=cmd_certs)
    return p


def cmd_certs(args) -> int:
    fed = create_federation(args.out, sites=args.sites, hosts=tuple(args.hosts or ()), days=args.days,
                            ca_days=args.ca_days, force=args.force)
    print(describe(fed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.federated.certs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["certs", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
