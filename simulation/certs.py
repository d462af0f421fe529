"""Throwaway certificates and device keys for a local or test deployment.

Why: Flower's SuperLink refuses SuperNode authentication without TLS, so even a
one-machine deployment needs a CA, a server certificate and one key pair per
device. These are for tests and demos only: a real deployment uses certificates
from the organisation's CA and keys generated on each device (README, "Real devices").

Layout of ``OUT_DIR`` (private keys are chmod 600)::

    ca.crt  ca.key                 throwaway CA (ca.key only signs superlink.crt)
    superlink.crt  superlink.key   SuperLink TLS certificate (SAN = the given hosts)
    device-K.key  device-K.pub     device K's node-authentication key pair
                                   (EC P-384, OpenSSH format, as Flower expects)
    models-signing.key  .pub       Ed25519 key that signs model manifests
                                   (``hybridfl sign``; devices verify with the .pub)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.signing import SIGNING_KEY, SIGNING_PUB, generate_signing_key

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
VALID_DAYS = 30
"""Short on purpose: these certificates are throwaway."""


@dataclass(frozen=True)
class CertFiles:
    """Paths of one certificate folder."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def device_key(self, device_id: int) -> Path:
        return self.root / f"device-{device_id}.key"

    def device_pub(self, device_id: int) -> Path:
        return self.root / f"device-{device_id}.pub"

    @property
    def signing_key(self) -> Path:
        return self.root / SIGNING_KEY

    @property
    def signing_pub(self) -> Path:
        return self.root / SIGNING_PUB


def default_certs_dir() -> Path:
    """``$XDG_CONFIG_HOME/hybridfl/certs`` (``~/.config/...``): never in a source tree."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hybridfl" / "certs"


def _write(path: Path, data: bytes, private: bool) -> None:
    """Private files are created 600 from the start (never world-readable, even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def device_key_pair(path_key: Path, path_pub: Path) -> None:
    """One EC P-384 key pair in OpenSSH format (``flower-supernode`` and
    ``flwr supernode register`` read exactly this)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(path_key, priv, private=True)
    _write(path_pub, pub + b"\n", private=False)


def make_certs(
    out_dir: Path, devices: int, hosts: list[str] | None = None, first_device: int = 0
) -> CertFiles:
    """Create a throwaway CA, a SuperLink certificate for ``hosts`` and device keys."""
    # The loopback names are always in: the SuperLink's own ServerApp reaches its
    # Control/Runtime listener on 127.0.0.1 with this certificate.
    hosts = list(hosts or DEFAULT_HOSTS)
    hosts += [h for h in DEFAULT_HOSTS if h not in hosts]
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)  # private keys inside: not the umask's choice
    files = CertFiles(out_dir)
    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=VALID_DAYS)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hybridfl throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write(files.root / CA_KEY, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(srv_key), private=True)
    _write(files.server_cert, srv_cert.public_bytes(serialization.Encoding.PEM), private=False)
    for k in range(first_device, first_device + devices):
        device_key_pair(files.device_key(k), files.device_pub(k))
    generate_signing_key(files.signing_key, files.signing_pub)
    return files


__all__ = ["DEFAULT_HOSTS", "CertFiles", "default_certs_dir", "device_key_pair", "make_certs"]
