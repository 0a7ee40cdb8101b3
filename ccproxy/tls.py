"""TLS for the listening side: certificate loading, protocol floor, cipher suites, groups, hot swap."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from ccproxy._compat import set_groups
from ccproxy.config._reader import ConfigError
from ccproxy.config._tls_names import DEFAULT_TLS12, TLS12_SUITES, TLS13_SUITES, openssl_groups
from ccproxy.config.server import TLSConfig


def certificate_options(config: TLSConfig) -> CertificateOptions:
    """Build the server-side TLS settings; file faults are ConfigErrors naming the key."""
    assert config.cert_file is not None and config.key_file is not None
    cert_path, key_path = config.cert_file, config.key_file
    if config.self_signed and not (os.path.exists(cert_path) and os.path.exists(key_path)):
        try:
            write_self_signed(cert_path, key_path)
        except OSError as e:
            raise ConfigError("server.tls.cert_file",
                              f"self_signed cannot write {e.filename or cert_path}: {e.strerror}") from None
    chain = _read_certificates(cert_path)
    key = _read_key(key_path)
    if chain[0].public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError("server.tls.key_file", "does not match the certificate in server.tls.cert_file")
    suites = config.cipher_suites or DEFAULT_TLS12
    tls12 = [TLS12_SUITES[n] for n in suites if n in TLS12_SUITES]
    tls13 = [n for n in suites if n in TLS13_SUITES]
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]  # cryptography objects are accepted (and preferred)
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_3 if config.min_version == "1.3" else TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(":".join(tls12) or "DEFAULT"),
        acceptableProtocols=[b"http/1.1"],
    )
    context = options.getContext()
    if tls13:
        context.set_tls13_ciphersuites(":".join(tls13).encode())
    # OpenSSL's own default offers X448 and P-521 too; the list is checked when the config is read.
    set_groups(context, openssl_groups(config.groups))
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """Hands every new connection the current settings; `swap` takes effect for the next one."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def swap(self, options: CertificateOptions) -> None:
        self.options = options

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return self.options.serverConnectionForTLS(protocol)


def write_self_signed(cert_path: str, key_path: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
                      days: int = 365) -> None:
    """A development certificate for loopback names; the key file is created mode 0600."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccproxy development certificate")])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None


def _read_certificates(path: str) -> list[x509.Certificate]:
    data = _read(path, "server.tls.cert_file")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise ConfigError("server.tls.cert_file", f"{path} holds no PEM certificate")
    return chain


def _read_key(path: str) -> serialization.SSHPrivateKeyTypes:
    data = _read(path, "server.tls.key_file")
    try:
        return serialization.load_pem_private_key(data, password=None)  # type: ignore[return-value]
    except (ValueError, TypeError):
        raise ConfigError("server.tls.key_file", f"{path} holds no unencrypted PEM private key") from None
