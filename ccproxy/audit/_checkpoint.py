"""Signed checkpoints of a chain's head: what lets verify see records removed from the end or the start.

A hash chain shows an edited record, but not a chain cut short: the records that are left still
link up. A checkpoint states, at a moment, "stream S had reached seq N with hash H, and its oldest
record kept was seq F", signed (Ed25519, or HMAC with the trail's key) and written away from the
records (a checkpoint file, every syslog output). A set of records that ends before the newest
checkpoint's N, or starts after its F, is missing records.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterator
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ccproxy.audit._record import NotCanonical, _dumps, parse_line, rfc3339
from ccproxy.config.audit import load_private_key

ED25519 = "ed25519"
HMAC = "hmac-sha256"
DIGEST = "sha256"  # unsigned: shows an honest cut, not a forger's; used when no key is configured


class Signer:
    def __init__(self, alg: str, private: Ed25519PrivateKey | None = None, key: bytes | None = None) -> None:
        self.alg = alg
        self.private = private
        self.key = key

    def sign(self, data: bytes) -> str:
        if self.private is not None:
            return base64.b64encode(self.private.sign(data)).decode()
        if self.key:
            return hmac.new(self.key, data, hashlib.sha256).hexdigest()
        return hashlib.sha256(data).hexdigest()


def load_public_key(path: str) -> Ed25519PublicKey:
    """A PEM public key, or the public half of a PEM private key."""
    with open(path, "rb") as f:
        data = f.read()
    if b"PRIVATE KEY" in data:
        private = serialization.load_pem_private_key(data, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return private.public_key()
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return public


def signer(signing_key: str | None, hmac_key: bytes | None) -> Signer:
    if signing_key:
        return Signer(ED25519, private=load_private_key(signing_key))
    if hmac_key:
        return Signer(HMAC, key=hmac_key)
    return Signer(DIGEST)


def write_signing_key(path: str) -> Ed25519PublicKey:
    """A new Ed25519 private key at `path` (0600); returns its public half."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key.public_key()


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make(stream: str, seq: int, head: str, first: int, now: float, sign: Signer, reason: str) -> dict[str, Any]:
    record: dict[str, Any] = {"type": "checkpoint", "stream": stream, "seq": seq, "hash": head, "first": first,
                              "time": rfc3339(now), "reason": reason, "alg": sign.alg}
    record["sig"] = sign.sign(_dumps(record))
    return record


def line(checkpoint: dict[str, Any]) -> bytes:
    return _dumps(checkpoint) + b"\n"


def is_checkpoint(record: dict[str, Any]) -> bool:
    return record.get("type") == "checkpoint"


def well_formed(record: dict[str, Any]) -> bool:
    return (is_checkpoint(record) and isinstance(record.get("seq"), int) and isinstance(record.get("first"), int)
            and isinstance(record.get("hash"), str) and isinstance(record.get("sig"), str)
            and record.get("stream") in ("audit", "access"))


def check(record: dict[str, Any], public: Ed25519PublicKey | None, key: bytes | None) -> bool | None:
    """True: the signature holds; False: it does not; None: no key to check it with."""
    body = _dumps({k: v for k, v in record.items() if k != "sig"})
    alg, sig = record.get("alg"), str(record.get("sig"))
    if alg == ED25519:
        if public is None:
            return None
        try:
            public.verify(base64.b64decode(sig, validate=True), body)
        except (InvalidSignature, ValueError):
            return False
        return True
    if alg == HMAC:
        if not key:
            return None
        return hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest(), sig)
    if alg == DIGEST:
        return hmac.compare_digest(hashlib.sha256(body).hexdigest(), sig)
    return False


def match_directory_owner(fd: int, path: str) -> None:
    """Run as root, a command gives what it writes to the owner of its directory (the daemon's user).

    Otherwise `ccproxy audit checkpoint` or `ccproxy privacy forget` run by root would leave files
    0600 root that the daemon can no longer read or append to.
    """
    if os.geteuid() != 0:
        return
    st = os.stat(os.path.dirname(os.path.abspath(path)))
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


def append(path: str, checkpoint: dict[str, Any]) -> None:
    """One append of one line (O_APPEND: the daemon and `ccproxy audit checkpoint` may share the file)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        match_directory_owner(fd, path)
        os.write(fd, line(checkpoint))
    finally:
        os.close(fd)


def read(path: str) -> Iterator[dict[str, Any]]:
    """The well-formed checkpoints of a file; other lines are skipped (verify judges them)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            try:
                record = parse_line(raw.rstrip(b"\n"))
            except NotCanonical:
                continue
            if well_formed(record):
                yield record


def last(path: str, stream: str) -> dict[str, Any] | None:
    newest = None
    for record in read(path):
        if record["stream"] == stream and (newest is None or record["seq"] >= newest["seq"]):
            newest = record
    return newest
