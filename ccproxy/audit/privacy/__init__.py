"""Personal data in the audit trail: sealed per subject, for GDPR erasure and portability.

`open_store(privacy)` opens the key store a config names; `at_rest_decoder(config)` says how that
config's audit files are read.
"""

from __future__ import annotations

from typing import Any

from ccproxy.audit.privacy._keys import KeyStore, KeyStoreError, master_key
from ccproxy.audit.privacy._seal import PERSONAL, AtRest, Sealer, open_sealed, plain_decode, subject_of

__all__ = ["PERSONAL", "AtRest", "KeyStore", "KeyStoreError", "Sealer", "at_rest_decoder", "open_sealed",
           "open_store", "plain_decode", "subject_of"]


def open_store(privacy: Any) -> KeyStore:
    if privacy.master_key is None:
        raise ValueError("privacy.keys.master_key is not set")
    olds = [master_key(s.reveal()) for s in privacy.old_master_keys]
    return KeyStore(privacy.key_store, master_key(privacy.master_key.reveal()), olds).open()


def at_rest_decoder(config: Any) -> tuple[Any, str]:
    """How the files of `config` are read: (decode, problem). Without encryption at rest, no key is needed."""
    if not config.privacy.encryption_at_rest:
        return plain_decode, ""
    try:
        key = open_store(config.privacy).at_rest_key(create=False)
    except (OSError, ValueError, KeyStoreError) as e:
        return None, f"the file key of the key store cannot be read: {e}"
    if key is None:
        return None, f"the file key is missing from {config.privacy.key_store}: the encrypted files cannot be read"
    return AtRest(key).decode, ""
