"""A node's own training data from a CSV or NPZ file (the node's config names the file).

* CSV: a header row with column names, then one row per sample of numbers
  (comma separated; ``#`` lines are comments). ``label_column`` names the label
  column; every other column is a feature. Parsed with
  :func:`numpy.genfromtxt` (no pickle, no eval).
* NPZ: a NumPy ``.npz`` archive holding two arrays: features (key ``X`` by
  default, 2-D numeric) and labels (``label_column``, default ``y``, 1-D).
  Loaded with ``allow_pickle=False``: an object array is refused.

Returns a :class:`~chimera.consensus.datasets.Shard`: ``X`` float64
``(n_samples, n_features)`` and ``y`` ``(n_samples,)`` (int64 when every label
is a whole number, float64 otherwise). Any problem (missing file, unknown
column, ragged rows, non-numeric or non-finite values, no samples, too large)
raises :class:`DatasetError` with one clear line naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from chimera.consensus.datasets import Shard

MAX_FILE_BYTES = 2 << 30  # 2 GiB


class DatasetError(Exception):
    """The data file cannot be used (message names the file and the reason)."""


def _labels(y: np.ndarray, path: Path) -> np.ndarray:
    if y.dtype.kind not in "iuf" or y.ndim != 1:
        raise DatasetError(f"{path}: labels must be a 1-D numeric array")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise DatasetError(f"{path}: labels contain NaN or infinite values")
    if np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y


def _check(X: np.ndarray, y: np.ndarray, path: Path) -> Shard:
    if X.ndim != 2 or X.shape[1] < 1:
        raise DatasetError(f"{path}: features must be a 2-D array with at least one column")
    if X.shape[0] == 0:
        raise DatasetError(f"{path}: no samples")
    if X.shape[0] != y.shape[0]:
        raise DatasetError(f"{path}: {X.shape[0]} feature rows but {y.shape[0]} labels")
    if not np.isfinite(X).all():
        bad = int(np.argwhere(~np.isfinite(X))[0][0])
        raise DatasetError(f"{path}: feature row {bad} has a missing, non-numeric or infinite value")
    return Shard(np.ascontiguousarray(X, dtype=np.float64), _labels(y, path))


def load_csv(path: str | Path, label_column: str = "label") -> Shard:
    """Load a CSV with a header row; ``label_column`` is the label, the rest are features.

    Raises:
        DatasetError: see the module docstring.
    """
    path = Path(path)
    _size_ok(path)
    try:
        with path.open("r", encoding="utf-8") as handle:
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
            data = np.genfromtxt(handle, delimiter=",", comments="#", dtype=np.float64, ndmin=2,
                                 invalid_raise=True)
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
    return _check(np.delete(data, index, axis=1), y, path)


def load_npz(path: str | Path, label_column: str = "y", features_key: str = "X") -> Shard:
    """Load features ``features_key`` and labels ``label_column`` from an ``.npz`` (no pickle).

    Raises:
        DatasetError: see the module docstring.
    """
    path = Path(path)
    _size_ok(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (features_key, label_column) if k not in archive.files]
            if missing:
                raise DatasetError(f"{path}: no array {missing[0]!r} (arrays: {', '.join(archive.files[:20])})")
            X = archive[features_key]
            y = archive[label_column]
    except DatasetError:
        raise
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a usable .npz ({str(exc)[:120]})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if X.dtype.kind not in "iuf":
        raise DatasetError(f"{path}: features must be numeric, not {X.dtype}")
    return _check(X.astype(np.float64), y, path)


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
