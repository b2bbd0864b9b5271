"""Certificates and keys for a test-bed control plane: one CA, serving and client certificates,
the service-account signing key pair, and the aggregation layer's front-proxy pair."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=365)

# Client identities: file stem -> (common name, organization). system:masters is cluster-admin.
CLIENTS = {
    "admin": ("llmserve-testbed-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kwok": ("llmserve-testbed-kwok", "system:masters"),
}


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write(path: Path, key, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".key").chmod(0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _sign(subject: x509.Name, key, issuer_cert, issuer_key, *, ca=False, usages=(), sans=()):
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _ca(path: Path, cn: str):
    key = _key()
    cert = _sign(_name(cn), key, None, None, ca=True)
    _write(path, key, cert)
    return cert, key


def generate(pki: Path, service_ip: str) -> None:
    """Write every credential the control plane needs into ``pki``."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(pki / "ca", "llmserve-testbed-ca")

    serving_key = _key()
    sans = [x509.DNSName(n) for n in (
        "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", service_ip)]
    _write(pki / "apiserver", serving_key, _sign(
        _name("kube-apiserver"), serving_key, ca_cert, ca_key,
        usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans))

    for stem, (cn, org) in CLIENTS.items():
        key = _key()
        _write(pki / stem, key, _sign(_name(cn, org), key, ca_cert, ca_key,
                                      usages=[ExtendedKeyUsageOID.CLIENT_AUTH]))

    proxy_ca_cert, proxy_ca_key = _ca(pki / "front-proxy-ca", "llmserve-testbed-front-proxy-ca")
    key = _key()
    _write(pki / "front-proxy-client", key, _sign(
        _name("front-proxy-client"), key, proxy_ca_cert, proxy_ca_key,
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH]))

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.key").write_bytes(sa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (pki / "sa.key").chmod(0o600)
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def serving_certificate(ca_dir: Path, dest: Path, dns_names: list[str]) -> tuple[Path, Path]:
    """A serving certificate for ``dns_names`` (and 127.0.0.1) signed by the CA in ``ca_dir``,
    written as ``<dest>.crt`` and ``<dest>.key``: for local servers the API server calls
    (aggregated APIs), whose APIService then carries the CA bundle instead of
    ``insecureSkipTLSVerify``."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = _key()
    sans = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _write(dest, key, _sign(_name(dns_names[0]), key, ca_cert, ca_key,
                            usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans))
    return dest.with_suffix(".crt"), dest.with_suffix(".key")
