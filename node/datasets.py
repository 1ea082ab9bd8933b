"""A node's own training data from a CSV or NPZ file (the node's config names the file).

* CSV: a header row with column names, then one row per sample of numbers
  (comma separated; ``#`` lines are comments). ``label_column`` names the label
  column; every other column is a feature. Parsed with
  :func:`numpy.loadtxt` (no pickle, no eval).
* NPZ: a NumPy ``.npz`` archive holding two arrays: features (key ``X`` by
  default, 2-D numeric) and labels (``label_column``, default ``y``, 1-D).
  Loaded with ``allow_pickle=False``: an object array is refused.

Returns a :class:`~chimera.consensus.datasets.Shard`: ``X`` float64
``(n_samples, n_features)`` and ``y`` ``(n_samples,)`` (int64 when every label
is a whole number, float64 otherwise: a regressor's targets; a classifier job
refuses a non-integral label when it trains). A whole-number label must be
exact: within +-2**53 when written as a float (CSV), within int64 otherwise.
Any problem (missing file, unknown column, ragged rows, non-numeric or
non-finite values, no samples, too large) raises :class:`DatasetError` with one
clear line naming the file. "Too large" is :data:`MAX_FILE_BYTES` for the file
and, for an ``.npz``, for its arrays once decompressed (checked from the
archive's entries and each array's header before anything is loaded).
"""

from __future__ import annotations

import math
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from chimera.consensus.datasets import Shard

MAX_FILE_BYTES = 2 << 30  # 2 GiB (the file, and an .npz's arrays decompressed)
MAX_EXACT_FLOAT_INT = 2**53  # a float label beyond this is not an exact whole number


class DatasetError(Exception):
    """The data file cannot be used (message names the file and the reason)."""


def _labels(y: np.ndarray, path: Path, column: str) -> np.ndarray:
    if y.dtype.kind not in "iuf" or y.ndim != 1:
        raise DatasetError(f"{path}: labels ({column!r}) must be a 1-D numeric array")
    if y.dtype.kind in "iu":  # already whole numbers: keep them exact (no float round trip)
        if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
            row = int(np.argmax(y > np.iinfo(np.int64).max))
            raise DatasetError(f"{path}: label of row {row} (column {column!r}) is {int(y[row])}, "
                               "above the int64 range")
        return y.astype(np.int64)
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        row = int(np.argmax(~np.isfinite(y)))
        raise DatasetError(f"{path}: label of row {row} (column {column!r}) is NaN or infinite")
    if np.all(y == np.round(y)):
        huge = np.abs(y) > MAX_EXACT_FLOAT_INT
        if huge.any():  # int64 conversion would wrap or round it: a different class id, silently
            row = int(np.argmax(huge))
            raise DatasetError(f"{path}: label of row {row} (column {column!r}) is {y[row]:g}; a whole-number "
                               f"label must be within +-2**53 to be exact")
        return y.astype(np.int64)
    return y


def _check(X: np.ndarray, y: np.ndarray, path: Path, column: str) -> Shard:
    if X.ndim != 2 or X.shape[1] < 1:
        raise DatasetError(f"{path}: features must be a 2-D array with at least one column")
    if X.shape[0] == 0:
        raise DatasetError(f"{path}: no samples")
    if y.ndim != 1:
        raise DatasetError(f"{path}: labels must be a 1-D array (got {y.ndim} dimensions)")
    if X.shape[0] != y.shape[0]:
        raise DatasetError(f"{path}: {X.shape[0]} feature rows but {y.shape[0]} labels")
    if not np.isfinite(X).all():
        bad = int(np.argwhere(~np.isfinite(X))[0][0])
        raise DatasetError(f"{path}: feature row {bad} has a missing, non-numeric or infinite value")
    return Shard(np.ascontiguousarray(X, dtype=np.float64), _labels(y, path, column))


def load_csv(path: str | Path, label_column: str = "label") -> Shard:
    """Load a CSV with a header row; ``label_column`` is the label, the rest are features.

    Raises:
        DatasetError: see the module docstring.
    """
    path = Path(path)
    _size_ok(path)
    try:
        with path.open("r", encoding="utf-8-sig") as handle:
            header = ""
            for line in handle:
                if line.strip() and not line.lstrip().startswith("#"):
                    header = line
                    break
            names = [n.strip() for n in header.strip().split(",")] if header else []
            if not names or not any(names):
                raise DatasetError(f"{path}: no header row")
            if label_column not in names:
                raise DatasetError(f"{path}: no column {label_column!r} (columns: {', '.join(names[:20])})")
            if len(set(names)) != len(names):
                raise DatasetError(f"{path}: duplicate column names in the header")
            # numpy's C reader: about the result's size in memory (genfromtxt built Python
            # lists, ~17x the file: a 500 MB CSV would not load on a 4 GB edge machine)
            with warnings.catch_warnings():  # "input contained no data": reported below as no samples
                warnings.simplefilter("ignore", UserWarning)
                data = np.loadtxt(handle, delimiter=",", comments="#", dtype=np.float64, ndmin=2)
    except DatasetError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a numeric CSV ({str(exc).splitlines()[0][:120]})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise DatasetError(f"{path}: no samples")
    if data.shape[1] != len(names):
        raise DatasetError(f"{path}: rows have {data.shape[1]} values, the header names {len(names)} columns")
    index = names.index(label_column)
    y = data[:, index]
    if not np.isfinite(y).all():
        bad = int(np.argwhere(~np.isfinite(y))[0][0])
        raise DatasetError(f"{path}: label of row {bad} is missing or not a number")
    return _check(np.delete(data, index, axis=1), y, path, label_column)


def load_npz(path: str | Path, label_column: str = "y", features_key: str = "X") -> Shard:
    """Load features ``features_key`` and labels ``label_column`` from an ``.npz`` (no pickle).

    Raises:
        DatasetError: see the module docstring.
    """
    path = Path(path)
    _size_ok(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            names = [n[:-4] if n.endswith(".npy") else n for n in members]
            missing = [k for k in (features_key, label_column) if k not in names]
            if missing:
                raise DatasetError(f"{path}: no array {missing[0]!r} (arrays: {', '.join(names[:20])})")
            unpacked = sum(info.file_size for info in members.values())
            if unpacked > MAX_FILE_BYTES:
                raise DatasetError(f"{path}: {unpacked} bytes once decompressed is above the "
                                   f"{MAX_FILE_BYTES} byte limit")
            X = _npz_array(archive, members, features_key, path)
            y = _npz_array(archive, members, label_column, path)
    except DatasetError:
        raise
    except (ValueError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError,
            zlib.error) as exc:
        raise DatasetError(f"{path}: not a usable .npz ({str(exc)[:120]})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if X.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: features must be numeric, not {X.dtype}")
    return _check(X.astype(np.float64), y, path, label_column)


def _npz_array(archive: zipfile.ZipFile, members: dict, key: str, path: Path) -> np.ndarray:
    """Array ``key`` of an ``.npz`` (no pickle), after its header says it is numeric and no
    larger than :data:`MAX_FILE_BYTES` as float64: the header is read first, so a small
    file cannot make the loader allocate what a hostile shape asks for.

    Raises:
        DatasetError: not an ``.npy`` entry, an object array, or too large.
        ValueError, zipfile.BadZipFile, OSError: a corrupt entry.
    """
    info = members.get(f"{key}.npy") or members[key]
    with archive.open(info) as entry:
        version = np.lib.format.read_magic(entry)  # ValueError unless an .npy entry
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(entry)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(entry)
        else:
            raise DatasetError(f"{path}: array {key!r} has an unsupported .npy format {version}")
        if dtype.hasobject or dtype.kind not in "iuf":
            raise DatasetError(f"{path}: array {key!r} must be numeric, not {dtype}")
        count = math.prod(shape)
        size = count * max(dtype.itemsize, 8)  # as loaded, then as the float64 copy used for training
        if size > MAX_FILE_BYTES:
            raise DatasetError(f"{path}: array {key!r} of shape {tuple(shape)} is {size} bytes in memory, "
                               f"above the {MAX_FILE_BYTES} byte limit")
    with archive.open(info) as entry:  # read_array reads the header again, from the start
        return np.lib.format.read_array(entry, allow_pickle=False)


def load_dataset(path: str | Path, label_column: str | None = None) -> Shard:
    """Load ``path`` by its suffix (``.csv`` or ``.npz``); ``label_column`` defaults to
    ``"label"`` (CSV) or ``"y"`` (NPZ).

    Raises:
        DatasetError: unknown suffix or any problem of the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return load_csv(path, label_column or "label")
    if suffix == ".npz":
        return load_npz(path, label_column or "y")
    raise DatasetError(f"{path}: unknown data file type {suffix or '(none)'!r}; use .csv or .npz")


def _size_ok(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_FILE_BYTES:
        raise DatasetError(f"{path}: {size} bytes is above the {MAX_FILE_BYTES} byte limit")
