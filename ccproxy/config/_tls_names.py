"""The TLS names a config may use: IANA cipher suite and group names with OpenSSL's, and their check.

A leaf of the config package: the config validates names against the linked OpenSSL without
reaching up into the TLS code that builds contexts from it.
"""

from __future__ import annotations

from OpenSSL import SSL

from ccproxy._compat import set_groups
from ccproxy.config._reader import ConfigError, join

# IANA names of the suites worth offering, with OpenSSL's names. Anything weaker (RC4, 3DES,
# export, anonymous, NULL) is deliberately absent: naming it is a config error.
TLS12_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256": "DHE-RSA-AES128-GCM-SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384": "DHE-RSA-AES256-GCM-SHA384",
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "DHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384": "ECDHE-ECDSA-AES256-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384": "ECDHE-RSA-AES256-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
}
TLS13_SUITES = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")

# Mozilla's "intermediate" profile for TLS 1.2, less the DHE suites: ECDHE with AES-GCM or ChaCha20.
DEFAULT_TLS12 = (
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
)


def check_suites(suites: tuple[str, ...], min_version: str, path: str) -> None:
    """Refuse unknown names, and a list that leaves the allowed protocol versions no suite."""
    for i, name in enumerate(suites):
        if name in TLS13_SUITES:
            continue
        if name not in TLS12_SUITES:
            raise ConfigError(join(path, i), f"unknown or unsupported cipher suite {name!r}")
        try:
            SSL.Context(SSL.TLS_METHOD).set_cipher_list(TLS12_SUITES[name].encode())
        except SSL.Error:
            raise ConfigError(join(path, i), f"cipher suite {name!r} is not available in this OpenSSL") from None
    if suites and min_version == "1.2" and not any(n in TLS12_SUITES for n in suites):
        raise ConfigError(path, "lists no TLS 1.2 suite: add one or set min_version: \"1.3\"")


# Key-exchange groups worth offering, by every name a config may use (IANA's, OpenSSL's, lower
# case), with OpenSSL's name. Curves below 256 bits and the legacy named curves are absent.
GROUPS = {
    "x25519mlkem768": "X25519MLKEM768",
    "secp256r1mlkem768": "SecP256r1MLKEM768",
    "secp384r1mlkem1024": "SecP384r1MLKEM1024",
    "x25519": "X25519",
    "x448": "X448",
    "secp256r1": "P-256",
    "prime256v1": "P-256",
    "p-256": "P-256",
    "secp384r1": "P-384",
    "p-384": "P-384",
    "secp521r1": "P-521",
    "p-521": "P-521",
    "ffdhe2048": "ffdhe2048",
    "ffdhe3072": "ffdhe3072",
    "ffdhe4096": "ffdhe4096",
    "ffdhe6144": "ffdhe6144",
    "ffdhe8192": "ffdhe8192",
}
# What Mozilla's "intermediate" profile offers (X25519, P-256, P-384), after the post-quantum
# hybrid where the linked OpenSSL has it (3.5 and later).
_PREFERRED_GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")


def available_group(name: str) -> bool:
    """Whether the linked OpenSSL offers this group (OpenSSL name)."""
    try:
        set_groups(SSL.Context(SSL.TLS_METHOD), [name])
    except ValueError:
        return False
    return True


def default_groups() -> tuple[str, ...]:
    return tuple(name for name in _PREFERRED_GROUPS if available_group(name))


def openssl_groups(groups: tuple[str, ...]) -> list[str]:
    """OpenSSL's names for the configured groups (already checked), or the defaults."""
    return [GROUPS[name.lower()] for name in groups] if groups else list(default_groups())


def check_groups(groups: tuple[str, ...], path: str) -> None:
    """Refuse unknown or weak names, names the linked OpenSSL lacks, and the same group twice."""
    seen: set[str] = set()
    for i, name in enumerate(groups):
        openssl = GROUPS.get(name.lower())
        if openssl is None:
            raise ConfigError(join(path, i), f"unknown or unsupported key-exchange group {name!r}")
        if not available_group(openssl):
            raise ConfigError(join(path, i), f"key-exchange group {name!r} is not available in this OpenSSL")
        if openssl in seen:
            raise ConfigError(join(path, i), f"key-exchange group {name!r} is listed twice")
        seen.add(openssl)
