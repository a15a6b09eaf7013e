"""The cluster key and the keys derived from it.

Every device holds the same cluster key (the text of --key or $HALO_KEY). It is never used
directly: each worker picks a random salt when it starts and stretches the text with scrypt
under that salt (so one captured datagram does not let anyone test guesses of a short key
cheaply, nor precompute guesses for every HALO cluster at once). A join then derives a fresh
pair of link keys -- one for datagrams, one for control messages -- from the stretched key
and both sides' nonces (HKDF-SHA256), so nothing recorded in an earlier session is ever
valid again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENV = "HALO_KEY"
SALT_BYTES = 16
NONCE_BYTES = 16
# scrypt cost: 2^15 x 8 x 128 bytes = 32 MiB and ~0.1 s per guess on this project's
# machines (several times that on a Raspberry Pi); paid once per worker and salt
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1


def key_text(given: str | None) -> tuple[str, bool]:
    """(key text, generated?) from --key, else $HALO_KEY, else a fresh random key."""
    text = given or os.environ.get(ENV)
    if text:
        return text, False
    return secrets.token_hex(16), True


@functools.lru_cache(maxsize=256)
def _stretch(text: str, salt: bytes) -> bytes:
    return hashlib.scrypt(text.encode(), salt=b"halo-cluster-key|" + salt, n=SCRYPT_N,
                          r=SCRYPT_R, p=SCRYPT_P, maxmem=64 << 20, dklen=32)


@dataclass(frozen=True)
class ClusterKey:
    """The cluster key as given; stretched per worker salt on demand (and remembered)."""

    text: str

    def stretched(self, salt: bytes) -> bytes:
        return _stretch(self.text, salt)

    def __repr__(self) -> str:  # never print the secret
        return "ClusterKey(…)"


def cluster_key(text: str) -> ClusterKey:
    if not text:
        raise ValueError("the cluster key is empty")
    return ClusterKey(text)


@dataclass(frozen=True)
class LinkKeys:
    """The keys of one coordinator-worker session: datagrams and control messages."""

    data: bytes
    control: bytes


def link_keys(stretched: bytes, coordinator_nonce: bytes, worker_nonce: bytes) -> LinkKeys:
    def derive(label: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32,
                    salt=coordinator_nonce + worker_nonce,
                    info=b"halo link v2|" + label).derive(stretched)

    return LinkKeys(derive(b"data"), derive(b"control"))
