"""Content-addressed module store: ``.wasm`` bytes on disk, named by SHA-256.

A module's name is the lowercase hex SHA-256 of its bytes (64 characters), so
a peer that fetches a module it lacks from another peer checks the bytes
against the name it asked for before using them (:meth:`ModuleStore.accept_fetched`);
a mismatch is the sending peer's fault (:class:`ModuleIntegrityError`, a
``RemoteProtocolError`` with reason ``bad_module_hash``). Only ``.wasm``
bytes ever travel between peers; compiled artefacts never do (see
:mod:`chimera.fabric.sandbox`).

Layout: ``root/<sha256>.wasm``, files 0600 in a 0700 directory, written
atomically (temporary file, fsync, rename). Every read re-hashes the bytes, so
a file damaged on disk is reported (and removed) rather than run.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path

from chimera.protocol.errors import RemoteProtocolError

DEFAULT_MAX_MODULE_BYTES = 16 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class ModuleIntegrityError(RemoteProtocolError):
    """Module bytes do not match the SHA-256 they were named by."""

    reason = "bad_module_hash"


class ModuleTooLarge(RemoteProtocolError):
    """Module bytes over the store's size limit."""

    reason = "oversize"


class ModuleNotFound(KeyError):
    """No module with that hash in this store."""


def module_hash(wasm: bytes) -> str:
    """Lowercase hex SHA-256 of ``wasm`` (the module's content address)."""
    return hashlib.sha256(wasm).hexdigest()


def check_hash_name(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex characters.

    Raises:
        ValueError: anything else (so a name can never escape the store's directory).
    """
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise ValueError(f"not a module hash (64 lowercase hex characters): {str(sha256)[:80]!r}")
    return sha256


class ModuleStore:
    """Modules on the node's disk, by content hash.

    Args:
        root: directory (created with mode 0700).
        max_module_bytes: largest module accepted by :meth:`put` / :meth:`accept_fetched`.
    Thread-safe.
    """

    def __init__(self, root: Path | str, *, max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        self.max_module_bytes = int(max_module_bytes)
        self._lock = threading.Lock()

    def _path(self, sha256: str) -> Path:
        return self.root / f"{check_hash_name(sha256)}.wasm"

    def put(self, wasm: bytes) -> str:
        """Store ``wasm``; returns its hash (idempotent).

        Raises:
            ModuleTooLarge: over ``max_module_bytes``.
            TypeError: not bytes.
        """
        if not isinstance(wasm, (bytes, bytearray)):
            raise TypeError("module bytes expected")
        if len(wasm) > self.max_module_bytes:
            raise ModuleTooLarge(f"module is {len(wasm)} bytes; the limit is {self.max_module_bytes}")
        wasm = bytes(wasm)
        sha = module_hash(wasm)
        path = self._path(sha)
        with self._lock:
            if path.is_file():
                return sha
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".wasm")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(wasm)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
                dir_fd = os.open(self.root, os.O_RDONLY)  # the rename itself survives a power loss
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return sha

    def accept_fetched(self, sha256: str, wasm: bytes) -> str:
        """Verify bytes fetched from a peer against the hash requested, then store them.

        Raises:
            ValueError: ``sha256`` is not a hash name (our own misuse).
            ModuleTooLarge: over ``max_module_bytes`` (checked before hashing).
            ModuleIntegrityError: the bytes hash to something else (the peer's fault).
        """
        check_hash_name(sha256)
        if not isinstance(wasm, (bytes, bytearray)):
            raise ModuleIntegrityError("fetched module is not bytes")
        if len(wasm) > self.max_module_bytes:
            raise ModuleTooLarge(f"fetched module is {len(wasm)} bytes; the limit is {self.max_module_bytes}")
        actual = module_hash(bytes(wasm))
        if actual != sha256:
            raise ModuleIntegrityError(f"fetched module hashes to {actual[:12]}, not {sha256[:12]}")
        return self.put(wasm)

    def get(self, sha256: str) -> bytes:
        """The module's bytes, re-verified.

        Raises:
            ModuleNotFound: not stored.
            ModuleIntegrityError: the file on disk no longer matches (it is removed).
        """
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModuleNotFound(sha256) from None
        if module_hash(data) != sha256:
            path.unlink(missing_ok=True)
            raise ModuleIntegrityError(f"stored module {sha256[:12]} is damaged; removed")
        return data

    def has(self, sha256: str) -> bool:
        try:
            return self._path(sha256).is_file()
        except ValueError:
            return False

    def remove(self, sha256: str) -> bool:
        """Delete a module; True if it was there."""
        path = self._path(sha256)
        with self._lock:
            existed = path.is_file()
            path.unlink(missing_ok=True)
        return existed

    def list(self) -> list[str]:
        """Hashes of the stored modules, sorted."""
        return sorted(p.stem for p in self.root.glob("*.wasm") if _SHA_RE.fullmatch(p.stem))

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.glob("*.wasm"))
