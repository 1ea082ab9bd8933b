"""Resource probes (psutil, NVML) and the content-addressed module store."""

from __future__ import annotations

import os

import msgpack
import pytest

from chimera.fabric.modules import ModuleIntegrityError, ModuleNotFound, ModuleStore, ModuleTooLarge, module_hash
from chimera.fabric.probes import StaticProbe, SystemProbe
from chimera.fabric.resources import GpuInfo, Resources
from chimera.protocol.errors import MalformedError
from chimera.protocol.messages import decode_fields, encode_fields
from fabric_helpers import wasm


def test_system_probe_reports_sane_values(tmp_path):
    probe = SystemProbe(tmp_path)
    res = probe.resources()
    assert res.cpu_count >= 1 and res.cpu_count == os.cpu_count()
    assert res.load_1m >= 0
    assert 0 < res.memory_available_bytes <= res.memory_total_bytes
    assert 0 < res.disk_free_bytes <= res.disk_total_bytes
    assert res.gpu_count == len(res.gpus) >= 0
    for gpu in res.gpus:  # only where an NVIDIA driver exists
        assert gpu.memory_total_bytes > 0 and 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0 <= gpu.utilization_percent <= 100 and gpu.name
    # advertised as a wire record: encodes and decodes back to the same value
    wire = msgpack.packb(encode_fields(res), use_bin_type=True)
    assert decode_fields(Resources, msgpack.unpackb(wire, raw=False)) == res
    probe.close()


def test_no_nvidia_driver_means_zero_gpus(tmp_path, monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    probe = SystemProbe(tmp_path)
    res = probe.resources()
    assert res.gpus == () and res.gpu_count == 0 and probe.nvml_error
    assert probe.resources().cpu_count >= 1  # carries on, and does not retry NVML every time


def test_static_probe_and_strict_decoding():
    inv = Resources(cpu_count=8, memory_total_bytes=1 << 34, memory_available_bytes=1 << 33,
                    gpus=(GpuInfo(index=0, name="H100", memory_total_bytes=80 << 30, memory_used_bytes=0),))
    assert StaticProbe(inv).resources() is inv and "1 GPU" in inv.describe()
    body = encode_fields(inv)
    body["gpus"][0]["utilization_percent"] = 101
    with pytest.raises(MalformedError):
        decode_fields(Resources, body)
    with pytest.raises(MalformedError):
        decode_fields(Resources, {**encode_fields(inv), "secret_field": 1})


def test_module_store_verifies_hashes(tmp_path):
    store = ModuleStore(tmp_path / "modules", max_module_bytes=1 << 20)
    data = wasm("wordfreq")
    sha = store.put(data)
    assert sha == module_hash(data) and store.has(sha) and store.list() == [sha]
    assert store.get(sha) == data
    assert oct((tmp_path / "modules" / f"{sha}.wasm").stat().st_mode & 0o777) == "0o600"
    other = wasm("counter")
    with pytest.raises(ModuleIntegrityError):
        store.accept_fetched(sha, other)  # a peer sent bytes that are not what we asked for
    assert store.accept_fetched(module_hash(other), other) == module_hash(other)
    with pytest.raises(ModuleTooLarge):
        store.accept_fetched("0" * 64, b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError):
        store.get("../../etc/passwd")
    with pytest.raises(ModuleNotFound):
        store.get("f" * 64)
    (tmp_path / "modules" / f"{sha}.wasm").write_bytes(b"damaged")
    with pytest.raises(ModuleIntegrityError):
        store.get(sha)
    assert not store.has(sha)
