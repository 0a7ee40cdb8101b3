"""Key-exchange groups: X25519, P-256 and P-384 by default (the post-quantum hybrid X25519MLKEM768
first where the linked OpenSSL has it), `server.tls.groups` to choose, names checked like cipher names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from OpenSSL import SSL

from ccproxy._compat import set_groups
from ccproxy.config import ConfigError, parse
from ccproxy.config._tls_names import available_group, default_groups
from ccproxy.config.server import TLSConfig
from ccproxy.tls import certificate_options
from tests.test_e2e_tls_reload import negotiated, s_client

# -- the config


def error_of(groups: Any) -> str:
    with pytest.raises(ConfigError) as e:
        parse({"server": {"tls": {"enabled": False, "groups": groups}}}, environ={})
    return str(e.value)


@pytest.mark.parametrize("groups,expected", [
    (["X25519", "brainpoolP256r1"], "server.tls.groups[1]: unknown or unsupported key-exchange group 'brainpoolP256r1'"),
    (["secp192r1"], "server.tls.groups[0]: unknown or unsupported key-exchange group 'secp192r1'"),
    (["nonsense"], "server.tls.groups[0]: unknown or unsupported key-exchange group 'nonsense'"),
    (["P-256", "secp256r1"], "server.tls.groups[1]: key-exchange group 'secp256r1' is listed twice"),
    ("X25519", "server.tls.groups: expected a list, got a string"),
])
def test_bad_group_lists_name_the_fault(groups: Any, expected: str) -> None:
    assert error_of(groups) == expected


def test_iana_and_openssl_names_accepted_in_any_case() -> None:
    config = parse({"server": {"tls": {"enabled": False, "groups": ["x25519", "SECP384R1", "P-256", "ffdhe3072"]}}},
                   environ={})
    assert config.server.tls.groups == ("x25519", "SECP384R1", "P-256", "ffdhe3072")


def test_defaults_follow_the_linked_openssl() -> None:
    assert default_groups()[-3:] == ("X25519", "P-256", "P-384")
    assert ("X25519MLKEM768" in default_groups()) is available_group("X25519MLKEM768")
    assert not available_group("no-such-group")


# -- handshakes in memory, with pyOpenSSL (linked to the same OpenSSL as the server)


@pytest.fixture(scope="module")
def server_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, trustme.CA]:
    tmp: Path = tmp_path_factory.mktemp("groups")
    # RSA: under TLS 1.2 the groups a client offers also bound the curve of an ECDSA certificate.
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    cert_file, key_file = str(tmp / "cert.pem"), str(tmp / "key.pem")
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    return cert_file, key_file, ca


def handshake(server: TLSConfig, client_groups: list[str] | None, tls12: bool = False) -> str | None:
    """The group a client offering `client_groups` (OpenSSL's defaults if None) agrees on, or None."""
    server_ctx = certificate_options(server).getContext()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    if client_groups is not None:
        set_groups(client_ctx, client_groups)
    if tls12:
        client_ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    s, c = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    s.set_accept_state()
    c.set_connect_state()
    for _ in range(10):
        for one, other in ((c, s), (s, c)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
    name = c.get_group_name()
    return name.decode() if isinstance(name, bytes) else name


def tls(server_files: tuple[str, str, Any], **extra: Any) -> TLSConfig:
    return TLSConfig(cert_file=server_files[0], key_file=server_files[1], **extra)


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_default_groups_in_memory(server_files: Any, tls12: bool) -> None:
    config = tls(server_files)
    for group in ("X25519", "P-256", "P-384"):
        assert handshake(config, [group], tls12) is not None, group
    for group in ("X448", "P-521", "ffdhe2048"):
        assert handshake(config, [group], tls12) is None, group


def test_a_client_offering_the_hybrid_gets_it(server_files: Any) -> None:
    if not available_group("X25519MLKEM768"):
        pytest.fail("this OpenSSL has no X25519MLKEM768: the hybrid default cannot be checked here")
    assert handshake(tls(server_files), ["X25519MLKEM768", "X25519"]) == "X25519MLKEM768"


def test_configured_groups_replace_the_defaults(server_files: Any) -> None:
    config = tls(server_files, groups=("secp384r1",))
    assert handshake(config, ["P-384"]) is not None
    assert handshake(config, ["X25519", "P-256"]) is None


# -- the real daemon, and openssl s_client


def test_s_client_groups_against_the_daemon(daemon: Any) -> None:
    d = daemon()
    for group in ("X448", "secp521r1"):
        for version in ("-tls1_3", "-tls1_2"):
            refused = s_client(d, version, "-groups", group)
            assert not negotiated(refused), (group, version, refused.stdout)
    for group, shown in (("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")):
        accepted = s_client(d, "-tls1_3", "-groups", group)
        assert negotiated(accepted), accepted.stdout
        assert f"Server Temp Key: {shown}" in accepted.stdout or f"Server Temp Key: ECDH, {shown}" in accepted.stdout, \
            accepted.stdout
    assert negotiated(s_client(d, "-tls1_2", "-groups", "P-256"))


def test_s_client_against_configured_groups(daemon: Any) -> None:
    d = daemon(groups=["P-384"])
    assert negotiated(s_client(d, "-groups", "P-384"))
    assert not negotiated(s_client(d, "-groups", "X25519:P-256"))


def test_groups_change_on_reload(daemon: Any) -> None:
    d = daemon()
    assert negotiated(s_client(d, "-groups", "X25519"))
    config = yaml.safe_load(d.config_path.read_text())
    config["server"]["tls"]["groups"] = ["secp384r1"]
    assert "config reloaded" in d.reload(config)
    assert not negotiated(s_client(d, "-groups", "X25519"))
    assert negotiated(s_client(d, "-groups", "P-384"))
    config["server"]["tls"]["groups"] = ["X448"]  # a known name, but not one worth offering by default: accepted when asked
    assert "config reloaded" in d.reload(config)
    assert negotiated(s_client(d, "-groups", "X448"))
    config["server"]["tls"]["groups"] = ["no-such-group"]
    line = d.reload(config)
    assert "server.tls.groups[0]" in line and "unknown or unsupported key-exchange group" in line
    assert negotiated(s_client(d, "-groups", "X448"))  # the running settings stay
