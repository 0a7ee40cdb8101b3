"""Personal data in the audit trail: sealed per subject, for GDPR erasure and portability.

`open_store(privacy)` opens the key store a config names.
"""

from __future__ import annotations

from typing import Any

from ccproxy.privacy._keys import KeyStore, KeyStoreError, master_key
from ccproxy.privacy._seal import PERSONAL, Sealer, open_sealed, subject_of

__all__ = ["PERSONAL", "KeyStore", "KeyStoreError", "Sealer", "open_sealed", "open_store", "subject_of"]


def open_store(privacy: Any) -> KeyStore:
    if privacy.master_key is None:
        raise ValueError("privacy.keys.master_key is not set")
    olds = [master_key(s.reveal()) for s in privacy.old_master_keys]
    return KeyStore(privacy.key_store, master_key(privacy.master_key.reveal()), olds).open()
