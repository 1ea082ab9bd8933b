"""Key files in a node's data directory.

* ``identity.key``: the 32-byte Ed25519 seed (the peer id's private key);
* ``transport.key``: the 32-byte CURVE (X25519) secret key of the node's ROUTER;
* ``network.token``: the join token of the network this node belongs to.

All are written atomically (temp file, fsync, rename) with mode 0600 before
they are used, reused on restart, and never printed: only fingerprints are.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from chimera.protocol.errors import InvalidTokenError
from chimera.protocol.identity import SigningIdentity
from chimera.protocol.network import Network

IDENTITY_FILE = "identity.key"
TRANSPORT_FILE = "transport.key"
NETWORK_FILE = "network.token"


class KeyFileError(Exception):
    """A key file exists but is unusable (wrong size, wrong mode)."""


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (:func:`chimera.fabric.modules.write_atomic`: temp
    file, fsync, rename, fsync of the folder), creating the folder first.

    Raises:
        OSError: the file cannot be written; its ``filename`` is ``path`` (not the temp file).
    """
    from chimera.fabric.modules import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, data, sync_dir=True, mode=mode)
    except OSError as exc:
        if exc.filename is None or exc.filename == str(path):
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None


def check_private(path: Path) -> None:
    """Raise :class:`KeyFileError` when ``path`` (a key or the network's join token, both
    secrets) has any group or other permission bit."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise KeyFileError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")


def _load_or_create_secret(path: Path) -> bytes:
    if path.exists():
        check_private(path)
        data = path.read_bytes()
        if len(data) != 32:
            raise KeyFileError(f"{path} must hold exactly 32 bytes, has {len(data)}")
        return data
    data = os.urandom(32)
    atomic_write(path, data)
    return data


def load_or_create_identity(data_dir: Path) -> SigningIdentity:
    return SigningIdentity(_load_or_create_secret(data_dir / IDENTITY_FILE))


class TransportKeys:
    """The node's CURVE server keypair (raw 32-byte X25519 keys)."""

    __slots__ = ("public", "secret")

    def __init__(self, secret: bytes) -> None:
        self.secret = secret
        self.public = X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return "TransportKeys(<secret hidden>)"


def load_or_create_transport_keys(data_dir: Path) -> TransportKeys:
    return TransportKeys(_load_or_create_secret(data_dir / TRANSPORT_FILE))


def load_network(data_dir: Path) -> Network | None:
    """The network whose join token ``data_dir`` holds; None when it holds none.

    Raises:
        KeyFileError: the file is not a join token, or others may read it (the token is
            the network's admission secret, like the identity key).
    """
    path = data_dir / NETWORK_FILE
    if not path.exists():
        return None
    check_private(path)
    try:
        return Network.from_token(path.read_text().strip())
    except InvalidTokenError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a join token (not UTF-8 text)") from None


def save_network(data_dir: Path, network: Network) -> None:
    atomic_write(data_dir / NETWORK_FILE, network.token().encode() + b"\n")
