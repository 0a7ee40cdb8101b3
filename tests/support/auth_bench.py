"""Cost of the auth layer's check per request, in process: `python -m tests.support.auth_bench`."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet import task

from ccproxy.auth import build_layer
from tests.support.authkit import config, context, run

SECRET = "an-hmac-secret-that-is-long-enough-000"


class Deps:
    def __init__(self) -> None:
        self.reactor = task.Clock()
        self.reactor.advance(time.time())
        self.blocklist = None


ROUTING = config({"enabled": False})


def per_call(layer: Any, headers: dict[str, str], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        assert run(layer, context(headers, cfg=ROUTING)) is None
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    baseline = per_call(build_layer(config({"enabled": False}), Deps(), None), {}, 20000)
    print(f"auth off (context only)         {baseline:8.1f} us/request")
    for count in (1, 100, 1000):
        keys = [{"id": f"k{i}", "key_sha256": hashlib.sha256(f"key-{i:020d}".encode()).hexdigest()}
                for i in range(count)]
        layer = build_layer(config({"enabled": True, "api_keys": keys}), Deps(), None)
        print(f"api_key, {count:4d} keys               {per_call(layer, {'x-api-key': f'key-{0:020d}'}, 5000):8.1f}"
              " us/request")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    claims = {"sub": "u", "exp": time.time() + 3600}
    for alg, key, cfg in (
        ("HS256", SECRET, {"secret": SECRET}),
        ("RS256", rsa_key, {"public_key_file": "/tmp/bench-rsa.pem"}),
        ("ES256", ec_key, {"public_key_file": "/tmp/bench-ec.pem"}),
    ):
        if alg != "HS256":
            from cryptography.hazmat.primitives import serialization

            pem = key.public_key().public_bytes(  # type: ignore[union-attr]
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            with open(cfg["public_key_file"], "wb") as f:
                f.write(pem)
        layer = build_layer(config({"enabled": True, "type": "jwt", "jwt": {"algorithms": [alg], **cfg}}), Deps(), None)
        token = jwt.encode(claims, key, algorithm=alg)
        print(f"jwt {alg}, same token             {per_call(layer, {'authorization': 'Bearer ' + token}, 3000):8.1f}"
              " us/request")
        tokens = [jwt.encode({**claims, "jti": str(i)}, key, algorithm=alg) for i in range(500)]
        started = time.perf_counter()
        for token in tokens:
            assert run(layer, context({"authorization": "Bearer " + token}, cfg=ROUTING)) is None
        print(f"jwt {alg}, a new token each time  {(time.perf_counter() - started) / 500 * 1e6:8.1f} us/request")


if __name__ == "__main__":
    main()
