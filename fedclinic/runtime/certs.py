"""A private CA, a SuperLink TLS certificate and SuperNode authentication keys.

    fedclinic certs --out certs --hosts localhost,127.0.0.1,superlink.hospital.org --supernodes 3

The CA signs the SuperLink's server certificate; SuperNodes and `flwr` trust
the CA, so the SuperLink can move hosts without redistributing anything but a
new server certificate. SuperNode keys are a separate matter: the SuperLink
(`--enable-supernode-auth`) admits only nodes whose public key was registered
with `flwr supernode register`, and Flower reads those keys in OpenSSH format
on a NIST curve (P-384, what `ssh-keygen -t ecdsa -b 384` makes).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# tolerate clocks a few minutes apart between the machine that signs and those that verify
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class CertifiedKey:
    """A private key and the certificate for its public half."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def parse_hosts(hosts: list[str] | tuple[str, ...]) -> list[x509.GeneralName]:
    """Host names and IP addresses as subject alternative names; ValueError on a bad one."""
    if not hosts:
        raise ValueError("expected at least one host name or IP address for the SuperLink certificate, got none")
    names: list[x509.GeneralName] = []
    for host in hosts:
        if not host:
            raise ValueError(f"expected host names or IP addresses, got an empty entry in {list(hosts)}")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        # digits and dots only (or a colon) reads as an IP address: 127.0.0.300 is a typo, not a host name
        if re.fullmatch(r"[\d.]+", host) or ":" in host:
            raise ValueError(f"expected a valid IPv4 or IPv6 address, got {host!r}")
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"expected a host name of letters, digits, '-' and '.', got {host!r}")
        names.append(x509.DNSName(host))
    return names


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"expected a validity of at least 1 day, got {days}")


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + timedelta(days=days))


def make_ca(*, days: int = 365, name: str = "fedclinic federation CA") -> CertifiedKey:
    """A self-signed CA that may sign server certificates but no further CAs."""
    _check_days(days)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return CertifiedKey(key, _validity(builder, days).sign(key, hashes.SHA384()))


def make_server_cert(ca: CertifiedKey, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, *,
                     days: int = 365) -> CertifiedKey:
    """A TLS server certificate for the SuperLink, signed by `ca`, valid for each of `hosts`."""
    names = parse_hosts(hosts)
    _check_days(days)
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # clients match the host they dialled against these names, never against the common name
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    return CertifiedKey(key, _validity(builder, days).sign(ca.key, hashes.SHA384()))


def make_supernode_keys(n: int) -> list[ec.EllipticCurvePrivateKey]:
    """`n` SuperNode authentication keys on P-384, the curve Flower generates its own keys on."""
    if n < 1:
        raise ValueError(f"expected at least 1 SuperNode key, got {n}")
    return [ec.generate_private_key(ec.SECP384R1()) for _ in range(n)]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def _ssh_public(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" {comment}\n".encode()


def _write(path: Path, data: bytes, *, private: bool) -> None:
    # a private key is created 600 from the start: never readable by others, not even for a moment
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)  # an overwritten file keeps its old mode otherwise


def superlink_hosts(hosts: list[str] | tuple[str, ...]) -> list[str]:
    """`hosts` plus localhost and 127.0.0.1: the SuperLink's own SuperExec reaches it on 127.0.0.1 and
    checks the same certificate, so without them no run ever starts."""
    return [*hosts, *(h for h in DEFAULT_HOSTS if h not in hosts)]


def write_certs(out_dir: str | os.PathLike, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
                supernodes: int = 1, *, days: int = 365, force: bool = False) -> dict[str, Path]:
    """Write ca.crt/key, superlink.crt/key and supernode-K(.pub) into `out_dir`; returns name -> path.

    The SuperLink certificate names `superlink_hosts(hosts)`. Refuses
    (FileExistsError) to overwrite any file unless `force`; then nothing is written.
    """
    parse_hosts(hosts)
    hosts = superlink_hosts(hosts)
    _check_days(days)
    if supernodes < 1:
        raise ValueError(f"expected at least 1 SuperNode key, got {supernodes}")
    out = Path(out_dir)
    names = ["ca.crt", "ca.key", "superlink.crt", "superlink.key"]
    names += [f"supernode-{k}{suffix}" for k in range(supernodes) for suffix in ("", ".pub")]
    paths = {name: out / name for name in names}
    if not force:
        for path in paths.values():
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass --force to overwrite it")

    ca = make_ca(days=days)
    server = make_server_cert(ca, hosts, days=days)
    out.mkdir(parents=True, exist_ok=True)
    _write(paths["ca.key"], _pem_key(ca.key), private=True)
    _write(paths["ca.crt"], _pem_cert(ca.cert), private=False)
    _write(paths["superlink.key"], _pem_key(server.key), private=True)
    _write(paths["superlink.crt"], _pem_cert(server.cert), private=False)
    for k, key in enumerate(make_supernode_keys(supernodes)):
        _write(paths[f"supernode-{k}"], _ssh_private(key), private=True)
        _write(paths[f"supernode-{k}.pub"], _ssh_public(key, f"fedclinic-supernode-{k}"), private=False)
    return paths
