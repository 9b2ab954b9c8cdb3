"""Certificates and keys of a fedrecon federation on Flower, made with ``cryptography``.

Writes to ``--out`` (default ``certificates/``):

- ``ca.crt``, ``ca.key``: the federation's own certificate authority (keep ``ca.key`` with
  the coordinator, offline if possible; give ``ca.crt`` to every site);
- ``server.pem``, ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and every ``--san`` (the SuperLink's host names / IPs);
- ``nodes/<name>`` and ``nodes/<name>.pub``: one SuperNode authentication key pair per
  ``--node`` (EC P-384, OpenSSH format). The private key stays at the site; the coordinator
  registers the ``.pub`` with ``fedrecon flower-register`` (``flwr supernode register``).

Usage::

    python scripts/make_certificates.py --out certificates --san superlink.example.org \\
        --node hospital_a --node hospital_b
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(["localhost", "127.0.0.1", *names]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrecon federation CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     sans: list[str], days: int) -> tuple[ec.EllipticCurvePrivateKey,
                                                          x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                        "fedrecon SuperLink")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format: ``<folder>/<name>`` and ``<name>.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid node name {name!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(folder / name, private, private=True),
            _write(folder / f"{name}.pub", public + f" {name}\n".encode()))


def make_certificates(out: str | os.PathLike, *, sans: list[str] | None = None,
                      nodes: list[str] | None = None, days: int = 365) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate and node key pairs to ``out``; returns the
    paths by name (``ca.crt``, ``server.pem``, ``server.key``, ``nodes/<name>``, ...)."""
    out = Path(out)
    ca_key, ca_cert = make_ca(days)
    key, cert = make_server_cert(ca_key, ca_cert, list(sans or []), days)
    pem = serialization.Encoding.PEM
    paths = {"ca.crt": _write(out / "ca.crt", ca_cert.public_bytes(pem)),
             "ca.key": _write(out / "ca.key", _pem_key(ca_key), private=True),
             "server.pem": _write(out / "server.pem", cert.public_bytes(pem)),
             "server.key": _write(out / "server.key", _pem_key(key), private=True)}
    for name in nodes or []:
        private, public = make_node_keys(out / "nodes", name)
        paths[f"nodes/{name}"] = private
        paths[f"nodes/{name}.pub"] = public
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="certificates", help="output folder")
    parser.add_argument("--san", action="append", default=[],
                        help="a host name or IP of the SuperLink (repeatable; localhost and "
                             "127.0.0.1 are always included)")
    parser.add_argument("--node", action="append", default=[],
                        help="make an authentication key pair for this SuperNode (repeatable)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = parser.parse_args(argv)
    for name, path in make_certificates(args.out, sans=args.san, nodes=args.node,
                                        days=args.days).items():
        print(f"{name:24s} {path}")


if __name__ == "__main__":
    main()
