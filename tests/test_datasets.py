"""Dataset files with damage a peer's operator can hand the node: a clear DatasetError, never
another exception (which escaped as an unretrieved task error, uncounted)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from chimera.node.datasets import DatasetError, load_dataset


def test_labels_that_are_not_one_dimensional_are_a_dataset_error(tmp_path):
    path = tmp_path / "scalar_y.npz"
    np.savez(path, X=np.ones((3, 2)), y=np.array(5))  # was IndexError from y.shape[0]
    with pytest.raises(DatasetError, match=r"labels must be a 1-D array"):
        load_dataset(path)
    np.savez(tmp_path / "2d.npz", X=np.ones((3, 2)), y=np.ones((3, 1)))
    with pytest.raises(DatasetError, match=r"labels must be a 1-D array"):
        load_dataset(tmp_path / "2d.npz")


def test_a_damaged_compressed_npz_is_a_dataset_error(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for key, arr in (("X", np.arange(600.0).reshape(200, 3)), ("y", np.arange(200) % 3)):
            b = io.BytesIO()
            np.save(b, arr)
            z.writestr(f"{key}.npy", b.getvalue())
    data = bytearray(buf.getvalue())
    data[60:90] = b"\xff" * 30  # inside X's deflate stream: zlib.error escaped before
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"damaged\.npz: not a usable \.npz"):
        load_dataset(path)


def test_a_csv_saved_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    """Excel writes UTF-8 CSV with a BOM: the first column was named '\\ufefflabel' (no column 'label')."""
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefflabel,a,b\n0,1.5,2\n1,3,4.5\n".encode())
    shard = load_dataset(path)
    assert shard.y.tolist() == [0, 1] and shard.X.tolist() == [[1.5, 2.0], [3.0, 4.5]]
