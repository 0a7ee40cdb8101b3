"""The key store: one random key per data subject, each wrapped by the master key, in its own file.

Layout under `privacy.keys.store` (directory 0700, files 0600):

    index.key             the key of subject ids (HMAC), wrapped
    at-rest.key           the key of whole-record encryption at rest (HIPAA), wrapped
    subjects/<sid>.key    one subject's key, wrapped
    generation            bumped by every erasure: the daemon drops its cached keys when it changes
    erasures.pending      erasures the daemon has not yet recorded in the audit trail

A wrapped key is JSON: {"v":1,"mk":<master key id>,"key":<base64 of nonce + AES-256-GCM ciphertext>},
the file's name as associated data (a key cannot be passed off as another). Erasing a subject
destroys its file; records sealed with that key can then never be read again, by anyone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ccproxy.audit._checkpoint import match_directory_owner

_CACHE_LIMIT = 100_000  # subject keys held in memory; beyond that the cache starts over


class KeyStoreError(Exception):
    pass


def master_key(secret: str) -> bytes:
    """The key-wrapping key derived from the configured master key (any string of 32+ characters)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"ccproxy privacy master key").derive(
        secret.encode())


def master_id(kek: bytes) -> str:
    return hashlib.sha256(b"ccproxy master key id" + kek).hexdigest()[:16]


class KeyStore:
    def __init__(self, directory: str, master: bytes, old: Iterable[bytes] = ()) -> None:
        self.dir = directory
        self.current = master_id(master)
        self.keks = {master_id(k): k for k in (master, *old)}
        self.cache: dict[str, bytes] = {}
        # Subject keys made on the request path, not yet synced (that is done off the reactor).
        self.unsynced: list[str] = []
        self._index: bytes | None = None
        self.generation = b""

    def open(self) -> KeyStore:
        os.makedirs(os.path.join(self.dir, "subjects"), mode=0o700, exist_ok=True)
        self.generation = self._read_generation()
        return self

    # Wrapping ------------------------------------------------------------------------------------

    def _wrap(self, name: str, key: bytes) -> bytes:
        nonce = os.urandom(12)
        sealed = AESGCM(self.keks[self.current]).encrypt(nonce, key, name.encode())
        return json.dumps({"v": 1, "mk": self.current, "key": base64.b64encode(nonce + sealed).decode()}).encode()

    def _unwrap(self, name: str, data: bytes) -> bytes:
        try:
            wrapped = json.loads(data)
            kek = self.keks.get(wrapped["mk"])
            blob = base64.b64decode(wrapped["key"])
        except (ValueError, KeyError, TypeError):
            raise KeyStoreError(f"{name}: not a wrapped key") from None
        if kek is None:
            raise KeyStoreError(f"{name}: wrapped by master key {wrapped['mk']}, which is not configured "
                                "(set it in privacy.keys.old_master_keys)")
        try:
            return AESGCM(kek).decrypt(blob[:12], blob[12:], name.encode())
        except Exception:
            raise KeyStoreError(f"{name}: cannot be unwrapped (changed, or another master key)") from None

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _read(self, name: str) -> bytes | None:
        try:
            with open(self._path(name), "rb") as f:
                return self._unwrap(name, f.read())
        except FileNotFoundError:
            return None

    def _create(self, name: str, sync: bool = True) -> bytes:
        """A new random key under `name`, unless another process made one first (then that one).

        `sync=False` leaves the fsync to `sync_new` (the daemon runs it in a thread): a new subject
        must not make the reactor wait for the disk.
        """
        key = os.urandom(32)
        path = self._path(name)
        tmp = f"{path}.{os.getpid()}.tmp"
        _write_synced(tmp, self._wrap(name, key), sync)
        try:
            os.link(tmp, path)  # fails if it exists: never replace a key records were sealed with
            if not sync:
                self.unsynced.append(path)
        except FileExistsError:
            existing = self._read(name)
            assert existing is not None
            key = existing
        finally:
            os.unlink(tmp)
        return key

    def _get(self, name: str, create: bool, sync: bool = True) -> bytes | None:
        key = self._read(name)
        if key is None and create:
            key = self._create(name, sync)
        return key

    def take_unsynced(self) -> list[str]:
        paths, self.unsynced = self.unsynced, []
        return paths

    def sync_new(self, paths: list[str]) -> None:
        """fsync new key files and their directory (blocking: call it in a thread)."""
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # erased in the meantime
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(self._path("subjects"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # Keys ------------------------------------------------------------------------------------------

    def index_key(self) -> bytes:
        if self._index is None:
            key = self._get("index.key", create=True)
            assert key is not None
            self._index = key
        return self._index

    def at_rest_key(self, create: bool = True) -> bytes | None:
        return self._get("at-rest.key", create)

    def subject_id(self, kind: str, value: str) -> str:
        """A keyed digest of the subject: stable, and naming no one without the key store."""
        return hmac.new(self.index_key(), f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:32]

    def subject_key(self, sid: str, create: bool = True, sync: bool = True) -> bytes | None:
        key = self.cache.get(sid)
        if key is None:
            key = self._get(f"subjects/{sid}.key", create, sync)
            if key is not None:
                if len(self.cache) >= _CACHE_LIMIT:
                    self.cache.clear()
                self.cache[sid] = key
        return key

    # Erasure ---------------------------------------------------------------------------------------

    def forget(self, sid: str, kind: str, when: str) -> bool:
        """Destroy a subject's key; True if there was one. The erasure is queued for the audit trail."""
        path = self._path(f"subjects/{sid}.key")
        existed = os.path.exists(path)
        if existed:
            size = os.path.getsize(path)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:  # overwrite before unlinking: the bytes do not linger in the file's old blocks
                os.write(fd, b"\0" * size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(path)
        self.cache.pop(sid, None)
        note = json.dumps({"subject": sid, "kind": kind, "time": when, "had_key": existed}) + "\n"
        pending = self._path("erasures.pending")
        fd = os.open(pending, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            match_directory_owner(fd, pending)
            os.write(fd, note.encode())
        finally:
            os.close(fd)
        self._bump_generation()
        return existed

    def _read_generation(self) -> bytes:
        try:
            with open(self._path("generation"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def _bump_generation(self) -> None:
        tmp = self._path(f"generation.{os.getpid()}.tmp")
        _write_synced(tmp, os.urandom(16).hex().encode())
        os.replace(tmp, self._path("generation"))

    def changed(self) -> bool:
        """Did an erasure happen since we last looked? If so, every cached subject key is dropped."""
        now = self._read_generation()
        if now == self.generation:
            return False
        self.generation = now
        self.cache.clear()
        return True

    def take_erasures(self) -> list[dict[str, object]]:
        """The erasures not yet recorded, taken out of the queue (renamed first: the CLI may append)."""
        path = self._path("erasures.pending")
        taken = f"{path}.{os.getpid()}"
        try:
            os.rename(path, taken)
        except FileNotFoundError:
            return []
        with open(taken, encoding="utf-8") as f:
            lines = f.read().splitlines()
        os.unlink(taken)
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # Master key rotation -------------------------------------------------------------------------

    def names(self) -> Iterator[str]:
        for name in ("index.key", "at-rest.key"):
            if os.path.exists(self._path(name)):
                yield name
        subjects = self._path("subjects")
        for entry in sorted(os.listdir(subjects)) if os.path.isdir(subjects) else ():
            if entry.endswith(".key"):
                yield f"subjects/{entry}"

    def rewrap(self) -> tuple[int, int]:
        """Wrap every key under the current master key; (rewrapped, already current). Records are untouched."""
        done = kept = 0
        for name in self.names():
            with open(self._path(name), "rb") as f:
                data = f.read()
            if json.loads(data).get("mk") == self.current:
                kept += 1
                continue
            key = self._unwrap(name, data)
            tmp = self._path(name) + ".rewrap"
            _write_synced(tmp, self._wrap(name, key))
            os.replace(tmp, self._path(name))
            done += 1
        return done, kept


def _write_synced(path: str, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        match_directory_owner(fd, path)
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
