"""Content-addressed module store: ``.wasm`` bytes on disk, named by SHA-256.

A module's name is the lowercase hex SHA-256 of its bytes (64 characters), so
a peer that fetches a module it lacks from another peer checks the bytes
against the name it asked for before using them (:meth:`ModuleStore.accept_fetched`);
a mismatch is the sending peer's fault (:class:`ModuleIntegrityError`, a
``RemoteProtocolError`` with reason ``bad_module_hash``). Only ``.wasm``
bytes ever travel between peers; compiled artefacts never do (see
:mod:`chimera.fabric.sandbox`).

Layout: ``root/<sha256>.wasm`` for modules stored here (deployed, submitted),
``root/fetched/<sha256>.wasm`` for modules fetched from peers; files 0600 in
0700 directories, written atomically (temporary file, fsync, rename). Fetched
modules have a byte quota (``fetched_max_bytes``): beyond it the least recently
used fetched modules are removed, never a pinned one (:meth:`ModuleStore.pin`:
a run, a task or a deploy that uses it), one the store's ``protected`` callback
names (the modules deployed agents name) or one the caller names as in use; a
fetched module stored here again with :meth:`ModuleStore.put` becomes a local
one. Every :meth:`ModuleStore.get` re-hashes the bytes, so a file damaged on
disk is reported (and removed) rather than run; :meth:`ModuleStore.read_chunk`
(serving peers) hashes each stored file once (by inode, size and mtime).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from chimera.protocol.errors import RemoteProtocolError


def write_atomic(path: Path, data: bytes, *, sync_dir: bool, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` (``mode``) through a temporary file in its folder: fsync,
    rename, and with ``sync_dir`` an fsync of the folder (the rename survives a power loss).
    The project's one atomic write (:func:`chimera.node.keys.atomic_write` wraps it).

    Raises:
        OSError: it could not be written (no temporary file is left behind).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if sync_dir:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

DEFAULT_MAX_MODULE_BYTES = 16 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class ModuleIntegrityError(RemoteProtocolError):
    """Module bytes do not match the SHA-256 they were named by."""

    reason = "bad_module_hash"


class ModuleTooLarge(RemoteProtocolError):
    """Module bytes over the store's size limit."""

    reason = "oversize"


class BadOffset(ValueError):
    """A chunk asked for beyond the module's end (:attr:`size`: the module's size)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


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
        fetched_max_bytes: quota of the modules fetched from peers (None: no quota).
        protected: called by every quota enforcement, under the store's lock (after the pins
            are read, so a user that records its use of a module before it unpins it is never
            missed): modules the quota must not remove, e.g. the ones deployed agents name.
            It may read the store but must not block on a thread that waits for the store.
    Thread-safe.
    """

    VERIFIED_KEPT = 256  # files whose hash read_chunk checked (by inode, size, mtime)

    def __init__(self, root: Path | str, *, max_module_bytes: int = DEFAULT_MAX_MODULE_BYTES,
                 fetched_max_bytes: int | None = None,
                 protected: Callable[[], Collection[str]] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o700)
        self.fetched_root = self.root / "fetched"
        self.fetched_root.mkdir(exist_ok=True, mode=0o700)
        self.fetched_root.chmod(0o700)
        self.max_module_bytes = int(max_module_bytes)
        self.fetched_max_bytes = fetched_max_bytes
        self.evicted = 0  # fetched modules removed for the quota
        self.protected = protected
        self._lock = threading.RLock()
        self._pins: dict[str, int] = {}  # sha -> users (runs, tasks, deploys) that need it kept
        self._used: dict[str, int] = {}  # sha -> use sequence (LRU of fetched modules; unknown: mtime order)
        self._use_seq = 0
        self._verified: OrderedDict[tuple[str, int, int, int], None] = OrderedDict()

    def _local(self, sha256: str) -> Path:
        return self.root / f"{check_hash_name(sha256)}.wasm"

    def _fetched(self, sha256: str) -> Path:
        return self.fetched_root / f"{check_hash_name(sha256)}.wasm"

    def _path(self, sha256: str) -> Path:
        local = self._local(sha256)
        if local.is_file():
            return local
        fetched = self._fetched(sha256)
        return fetched if fetched.is_file() else local

    def _touch(self, sha256: str) -> None:
        with self._lock:
            self._use_seq += 1
            self._used[sha256] = self._use_seq

    def put(self, wasm: bytes) -> str:
        """Store ``wasm`` as a local module (no quota); returns its hash (idempotent; a fetched
        copy becomes local).

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
        path = self._local(sha)
        with self._lock:
            if path.is_file():
                return sha
            write_atomic(path, wasm, sync_dir=True)
            self._fetched(sha).unlink(missing_ok=True)
        return sha

    def accept_fetched(self, sha256: str, wasm: bytes, *, keep: Collection[str] = ()) -> str:
        """Verify bytes fetched from a peer against the hash requested, then store them as a
        fetched module; then enforce the quota (:meth:`enforce_quota` with ``keep``).

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
        with self._lock:
            if not self.has(sha256):
                write_atomic(self._fetched(sha256), bytes(wasm), sync_dir=True)
        self._touch(sha256)
        self.enforce_quota(keep={*keep, sha256})
        return sha256

    def pin(self, sha256: str) -> bool:
        """Keep ``sha256`` out of the quota's reach until a matching :meth:`unpin` (pins count:
        each user pins and unpins once). Returns whether the module is stored now, checked
        atomically with the pin: True means it stays until unpinned; False means it is not
        here (a module fetched later is kept too), and the caller still unpins.

        Raises:
            ValueError: ``sha256`` is not a hash name.
        """
        check_hash_name(sha256)
        with self._lock:
            self._pins[sha256] = self._pins.get(sha256, 0) + 1
            return self.has(sha256)

    def unpin(self, sha256: str) -> None:
        """Release one :meth:`pin` (an unpinned name is ignored); the quota applies again at the
        next enforcement once nobody pins it."""
        with self._lock:
            n = self._pins.get(sha256, 0) - 1
            if n > 0:
                self._pins[sha256] = n
            else:
                self._pins.pop(sha256, None)

    @contextmanager
    def held(self, sha256: str) -> Iterator[str]:
        """Pinned for the ``with`` block (:meth:`pin`).

        Raises:
            ModuleNotFound: not stored (nothing stays pinned).
            ValueError: ``sha256`` is not a hash name.
        """
        present = self.pin(sha256)
        try:
            if not present:
                raise ModuleNotFound(f"module {sha256[:12]} is not in this node's store")
            yield sha256
        finally:
            self.unpin(sha256)

    def pinned(self) -> dict[str, int]:
        """Modules pinned now, with their number of users."""
        with self._lock:
            return dict(self._pins)

    def enforce_quota(self, keep: Collection[str] = ()) -> int:
        """Remove least recently used fetched modules until the fetched modules fit
        ``fetched_max_bytes``, never one in ``keep``, pinned (:meth:`pin`) or ``protected``;
        returns how many were removed (also added to :attr:`evicted`).

        Raises:
            Exception: whatever the ``protected`` callback raises (nothing is removed then).
        """
        if self.fetched_max_bytes is None:
            return 0
        with self._lock:
            files = []
            for p in self.fetched_root.glob("*.wasm"):
                try:
                    st = p.stat()
                except OSError:
                    continue
                files.append((self._used.get(p.stem, 0), st.st_mtime_ns, p, st.st_size))
            total = sum(f[3] for f in files)
            if total <= self.fetched_max_bytes:
                return 0
            keep = {*keep, *self._pins}
            if self.protected is not None:
                keep.update(self.protected())
            removed = 0
            for _, _, p, size in sorted(files, key=lambda f: (f[0], f[1])):
                if total <= self.fetched_max_bytes:
                    break
                if p.stem in keep:
                    continue
                p.unlink(missing_ok=True)
                self._used.pop(p.stem, None)
                total -= size
                removed += 1
            self.evicted += removed
        return removed

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
        self._touch(sha256)
        return data

    def read_chunk(self, sha256: str, offset: int, max_bytes: int) -> tuple[bytes, int]:
        """``(bytes at offset, up to max_bytes; the module's size)``. The whole file is hashed only
        the first time this (inode, size, mtime) is read; later chunks read just their bytes.

        Raises:
            ModuleNotFound: not stored.
            ModuleIntegrityError: the file on disk does not match its name (it is removed).
            BadOffset: ``offset`` beyond the module's end.
        """
        path = self._path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ModuleNotFound(sha256) from None
        try:
            st = os.fstat(fd)
            key = (sha256, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                known = key in self._verified
                if known:
                    self._verified.move_to_end(key)
            if not known:
                h = hashlib.sha256()
                pos = 0
                while True:
                    block = os.pread(fd, 1 << 20, pos)
                    if not block:
                        break
                    h.update(block)
                    pos += len(block)
                if h.hexdigest() != sha256:
                    path.unlink(missing_ok=True)
                    raise ModuleIntegrityError(f"stored module {sha256[:12]} is damaged; removed")
                with self._lock:
                    self._verified[key] = None
                    while len(self._verified) > self.VERIFIED_KEPT:
                        self._verified.popitem(last=False)
            if offset > st.st_size:
                raise BadOffset(f"offset {offset} beyond the module's {st.st_size} bytes", st.st_size)
            data = os.pread(fd, max(0, min(max_bytes, st.st_size - offset)), offset)
        finally:
            os.close(fd)
        self._touch(sha256)
        return data, st.st_size

    def is_verified(self, sha256: str) -> bool:
        """True when :meth:`read_chunk` already hashed the file as it is now (one stat)."""
        try:
            st = self._path(sha256).stat()
        except (OSError, ValueError):
            return False
        with self._lock:
            return (sha256, st.st_ino, st.st_size, st.st_mtime_ns) in self._verified

    def has(self, sha256: str) -> bool:
        try:
            return self._local(sha256).is_file() or self._fetched(sha256).is_file()
        except ValueError:
            return False

    def is_fetched(self, sha256: str) -> bool:
        """True when the module is stored only as a fetched one (under the quota)."""
        return not self._local(sha256).is_file() and self._fetched(sha256).is_file()

    def size(self, sha256: str) -> int:
        """The stored module's size in bytes. Raises ModuleNotFound."""
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError:
            raise ModuleNotFound(sha256) from None

    def remove(self, sha256: str) -> bool:
        """Delete a module; True if it was there."""
        with self._lock:
            existed = False
            for path in (self._local(sha256), self._fetched(sha256)):
                existed |= path.is_file()
                path.unlink(missing_ok=True)
        return existed

    def list(self) -> list[str]:
        """Hashes of the stored modules (local and fetched), sorted."""
        return sorted({p.stem for d in (self.root, self.fetched_root) for p in d.glob("*.wasm")
                       if _SHA_RE.fullmatch(p.stem)})

    def total_bytes(self) -> int:
        return _sizes(self.root) + _sizes(self.fetched_root)

    def fetched_bytes(self) -> int:
        return _sizes(self.fetched_root)


def _sizes(directory: Path) -> int:
    total = 0
    for p in directory.glob("*.wasm"):
        try:
            total += p.stat().st_size
        except OSError:  # removed meanwhile
            pass
    return total
