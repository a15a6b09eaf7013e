"""The cluster key: a shared secret every device must hold (from --key or $HALO_KEY)."""

from __future__ import annotations

import hashlib
import os
import secrets

ENV = "HALO_KEY"


def key_text(given: str | None) -> tuple[str, bool]:
    """(key text, generated?) from --key, else $HALO_KEY, else a fresh random key."""
    text = given or os.environ.get(ENV)
    if text:
        return text, False
    return secrets.token_hex(16), True


def key_bytes(text: str) -> bytes:
    """Any text -> a 32-byte MAC key."""
    return hashlib.sha256(b"halo-cluster-key|" + text.encode()).digest()
