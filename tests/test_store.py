"""The zarr v3 model store: exact round trips, laziness, chunking, atomic saves, and every refusal on bad stores."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

dask_array = pytest.importorskip("dask.array")
zarr = pytest.importorskip("zarr")

from recurjac_scale.errors import (  # noqa: E402
    InputError,
    NonFiniteError,
    OutputExistsError,
    StoreError,
    UnsupportedActivationError,
)
from recurjac_scale.network.model import InputSpec, Network  # noqa: E402
from recurjac_scale.network import store as store_mod  # noqa: E402
from recurjac_scale.network.store import (  # noqa: E402
    DEFAULT_TARGET_CHUNK_BYTES,
    FORMAT_VERSION,
    choose_chunks,
    file_sha256,
    layer_arrays,
    network_store_info,
    open_network,
    save_network,
    verify_network_store,
)

MiB = 2**20


def _net(rng, widths=(12, 9, 7, 4), dtype=np.float64, acts=None, out=None, spec=None, provenance=None):
    ws = [rng.standard_normal((widths[k + 1], widths[k])).astype(dtype) for k in range(len(widths) - 1)]
    bs = [rng.standard_normal(widths[k + 1]).astype(dtype) for k in range(len(widths) - 1)]
    acts = acts if acts is not None else ["relu"] * (len(widths) - 2)
    return Network(ws, bs, acts, output_activation=out, input_spec=spec, provenance=provenance)


def _bits_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and path.name in p.name)


def _edit_attrs(path: Path, fn) -> None:
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    fn(meta["attributes"])
    meta_file.write_text(json.dumps(meta))


# -- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_edge", [None, 1, 3, 5])
def test_round_trip_is_bitwise(tmp_path, rng, dtype, chunk_edge):
    net = _net(rng, dtype=dtype)
    # Values that a lossy or re-typed path would change: -0.0, subnormals, extremes, odd mantissas.
    fi = np.finfo(dtype)
    special = np.array([-0.0, fi.tiny / 4, -fi.tiny / 8, fi.max, -fi.max, fi.eps, 1 / 3], dtype=dtype)
    net.weights[0].flat[: special.size] = special
    net.biases[-1][:2] = [-0.0, fi.smallest_subnormal]
    path = save_network(net, tmp_path / "m.zarr", chunk_edge=chunk_edge)
    back = open_network(path)
    assert back.is_lazy
    for a, b in zip(net.weights + net.biases, back.weights + back.biases):
        got = b.compute()
        assert _bits_equal(a, got)
    assert np.signbit(back.weights[0].compute().flat[0])  # -0.0 kept


def test_round_trip_metadata(tmp_path, rng):
    lo = np.zeros(12)
    hi = np.linspace(0.5, 2.0, 12)
    lo[3] = -np.inf  # an unbounded coordinate: not JSON, stored as a string
    spec = InputSpec(shape=(3, 2, 2), layout="CHW", domain_lower=lo, domain_upper=hi)
    from recurjac_scale.activations import get_activation

    net = _net(
        rng,
        acts=[get_activation("leaky_relu", alpha=0.3), "hard_sigmoid"],
        out="sigmoid",
        spec=spec,
        provenance={"source": "x.onnx", "sha256": "ab" * 32, "importer": "test 1", "nested": {"k": [1, 2]}},
    )
    norm = net.with_normalization([0.1, 0.2, 0.3], [2.0, 4.0, 0.5])
    path = save_network(norm, tmp_path / "m.zarr")
    back = open_network(path)
    assert [a.to_spec() for a in back.activations] == [{"name": "leaky_relu", "alpha": 0.3},
                                                     {"name": "hard_sigmoid", "alpha": 0.2, "beta": 0.5}]
    assert back.output_activation.to_spec() == {"name": "sigmoid"}
    s = back.input_spec
    assert s.shape == (3, 2, 2) and s.layout == "CHW"
    assert np.array_equal(s.domain_lower, lo) and np.array_equal(s.domain_upper, hi)
    assert np.array_equal(s.mean, [0.1, 0.2, 0.3]) and np.array_equal(s.std, [2.0, 4.0, 0.5])
    for key in ("source", "sha256", "importer", "nested"):
        assert back.provenance[key] == norm.provenance[key]
    assert "created" in back.provenance and back.provenance["recurjac_scale_version"]
    x = rng.uniform(0.0, 0.5, size=(6, 12))
    assert np.array_equal(back.forward(x), norm.forward(x))
    # The attributes are strict JSON (no Infinity / NaN tokens).
    text = (path / "zarr.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_open_is_lazy_and_chunked_like_the_store(tmp_path, rng):
    net = _net(rng, widths=(40, 30, 5))
    path = save_network(net, tmp_path / "m.zarr", chunk_edge=8)
    back = open_network(path)
    for (wz, bz), w, b in zip(layer_arrays(path), back.weights, back.biases):
        assert isinstance(w, dask_array.Array) and isinstance(b, dask_array.Array)
        assert w.chunksize == wz.chunks and b.chunksize == bz.chunks
        assert len(w.chunks[0]) == math.ceil(wz.shape[0] / wz.chunks[0])
    # Remove every chunk file: opening and describing must still work (nothing but metadata is read) ...
    for k in range(back.n_layers):
        for name in ("weight", "bias"):
            shutil.rmtree(path / "layers" / str(k) / name / "c")
    lazy = open_network(path)
    info = network_store_info(path)
    assert lazy.widths == (40, 30, 5) and info["complete"] is False
    assert all(e["weight"]["chunks_stored"] == 0 for e in info["layers"])
    # ... and a missing chunk reads as NaN (the fill value), never as zeros.
    with pytest.raises(NonFiniteError):
        lazy.validate(lazy=True)
    with pytest.raises(StoreError, match="NaN"):
        verify_network_store(path)


def test_save_lazy_network_streams_and_round_trips(tmp_path, rng):
    net = _net(rng, widths=(33, 21, 6))
    first = save_network(net, tmp_path / "a.zarr", chunk_edge=4)
    lazy = open_network(first)
    second = save_network(lazy, tmp_path / "b.zarr", chunk_edge=7)
    again = open_network(second)
    assert layer_arrays(second)[0][0].chunks == (7, 7)
    for a, b in zip(net.weights + net.biases, again.weights + again.biases):
        assert _bits_equal(a, b.compute())


def test_compressors_and_dtype(tmp_path, rng):
    net = _net(rng)
    for comp in ("blosc", "none", "zstd"):
        p = save_network(net, tmp_path / f"{comp}.zarr", compressor=comp)
        back = open_network(p).materialize()
        assert all(_bits_equal(a, b) for a, b in zip(net.weights, back.weights))
        codecs = network_store_info(p)["layers"][0]["weight"]["codecs"]
        if comp == "none":
            assert codecs == ["bytes(endian=little)"]
        else:
            assert any(c.startswith("blosc" if comp == "blosc" else "zstd") for c in codecs)
    with pytest.raises(InputError, match="compressor"):
        save_network(net, tmp_path / "bad.zarr", compressor="lzma-lossy")
    # Mixed float32 / float64 arrays are stored as float64 (exact); all-float32 stays float32.
    mixed = Network([net.weights[0].astype(np.float32), *net.weights[1:]], net.biases, net.activations)
    p = save_network(mixed, tmp_path / "mixed.zarr")
    assert network_store_info(p)["dtype"] == "float64"
    assert _bits_equal(open_network(p).weights[0].compute(), net.weights[0].astype(np.float32).astype(np.float64))
    p = save_network(net, tmp_path / "f32.zarr", dtype="float32")
    assert open_network(p).weights[0].dtype == np.float32
    with pytest.raises(InputError, match="float32 or float64"):
        save_network(net, tmp_path / "f16.zarr", dtype="float16")


# -- chunk policy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(10_000, 10_000), (100_000, 784), (784, 100_000), (4096, 4096), (2000, 3000)])
@pytest.mark.parametrize("itemsize", [8, 4])
def test_default_chunks_are_8_to_32_mib(shape, itemsize):
    chunks = choose_chunks(shape, itemsize)
    nbytes = chunks[0] * chunks[1] * itemsize
    if chunks == shape:
        assert nbytes <= 32 * MiB
    else:
        assert 8 * MiB <= nbytes <= 32 * MiB, (chunks, nbytes / MiB)
    assert all(1 <= c <= s for c, s in zip(chunks, shape))


def test_chunk_policy_small_fixed_and_invalid():
    assert choose_chunks((32, 64), 8) == (32, 64)
    assert choose_chunks((50,), 8) == (50,)
    assert choose_chunks((10**9,), 8) == (DEFAULT_TARGET_CHUNK_BYTES // 8,)
    assert choose_chunks((100, 7), 8, chunk_edge=16) == (16, 7)
    assert choose_chunks((5000, 5000), 8, target_chunk_bytes=MiB) == (256, 256)
    for bad in (0, -3, 2.5):
        with pytest.raises(InputError):
            choose_chunks((10, 10), 8, chunk_edge=bad)
    with pytest.raises(InputError):
        choose_chunks((10, 10), 8, target_chunk_bytes=4)


def test_store_info_fields(tmp_path, rng):
    net = _net(rng, widths=(20, 13, 3), provenance={"source": "s.npz"})
    path = save_network(net, tmp_path / "m.zarr", chunk_edge=6)
    info = network_store_info(path)
    json.dumps(info)  # JSON-able
    assert info["format_version"] == FORMAT_VERSION and info["widths"] == [20, 13, 3]
    assert info["n_parameters"] == 20 * 13 + 13 + 13 * 3 + 3
    w0 = info["layers"][0]["weight"]
    assert w0["shape"] == [13, 20] and w0["chunks"] == [6, 6]
    assert w0["n_chunks"] == math.ceil(13 / 6) * math.ceil(20 / 6) == w0["chunks_stored"]
    assert w0["bytes"] == 13 * 20 * 8 and w0["bytes_stored"] > 0
    assert info["bytes"] == sum(a.size * 8 for a in net.weights + net.biases)
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["provenance"]["source"] == "s.npz" and info["complete"] is True


def test_file_sha256(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(3 * 2**20 + 17)
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


# -- refusing to write ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(tmp_path, rng, bad):
    net = _net(rng)
    net.weights[1][2, 3] = bad
    target = tmp_path / "m.zarr"
    with pytest.raises(NonFiniteError, match="layer 1 weight"):
        save_network(net, target)
    assert not target.exists() and _siblings(target) == []


def test_non_finite_lazy_weights_are_refused_without_leftovers(tmp_path, rng):
    net = _net(rng, widths=(16, 12, 3))
    w = net.weights[0].copy()
    w[11, 15] = np.nan
    lazy = Network([dask_array.from_array(w, chunks=5), net.weights[1]], net.biases, net.activations, validate=False)
    target = tmp_path / "m.zarr"
    with pytest.raises(NonFiniteError, match="layer 0 weight"):
        save_network(lazy, target, chunk_edge=4)
    assert not target.exists() and _siblings(target) == []


def test_float32_overflow_is_refused(tmp_path, rng):
    net = _net(rng)
    net.weights[0][0, 0] = 1e300
    with pytest.raises(NonFiniteError):
        save_network(net, tmp_path / "m.zarr", dtype="float32")


def test_existing_output_is_never_overwritten_silently(tmp_path, rng):
    a, b = _net(rng), _net(rng)
    path = save_network(a, tmp_path / "m.zarr")
    before = sorted((p.relative_to(path), p.read_bytes()) for p in path.rglob("*") if p.is_file())
    with pytest.raises(OutputExistsError, match="already exists"):
        save_network(b, path)
    after = sorted((p.relative_to(path), p.read_bytes()) for p in path.rglob("*") if p.is_file())
    assert before == after
    save_network(b, path, overwrite=True)
    assert _bits_equal(open_network(path).weights[0].compute(), b.weights[0])
    assert _siblings(path) == []
    # A folder that is not a zarr store is never deleted, even with overwrite.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a zarr store"):
        save_network(a, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(InputError, match="does not exist"):
        save_network(a, tmp_path / "no" / "such" / "m.zarr")


def test_interrupted_save_leaves_nothing_under_the_final_name(tmp_path, rng, monkeypatch):
    net = _net(rng)
    old = _net(rng)
    path = save_network(old, tmp_path / "m.zarr")
    target = tmp_path / "new.zarr"
    calls = {"n": 0}
    real = store_mod._place

    def boom(*args, **kwargs):
        calls["n"] += 1
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(store_mod, "_place", boom)
    with pytest.raises(KeyboardInterrupt):
        save_network(net, target)
    assert not target.exists() and _siblings(target) == []
    with pytest.raises(KeyboardInterrupt):
        save_network(net, path, overwrite=True)
    # The old store is intact and still opens.
    assert _bits_equal(open_network(path).weights[0].compute(), old.weights[0])
    assert _siblings(path) == [] and calls["n"] == 2
    monkeypatch.setattr(store_mod, "_place", real)

    # Interrupted while writing the arrays (after some chunks are on disk).
    real_check = store_mod._check_finite_block
    seen = {"n": 0}

    def flaky(block, where):
        seen["n"] += 1
        if seen["n"] == 3:
            raise KeyboardInterrupt("simulated interruption while writing")
        return real_check(block, where)

    monkeypatch.setattr(store_mod, "_check_finite_block", flaky)
    lazy = open_network(path)
    with pytest.raises(KeyboardInterrupt):
        save_network(lazy, target, chunk_edge=2)
    assert not target.exists() and _siblings(target) == []


# -- refusing to read -------------------------------------------------------------------------------------------


@pytest.fixture
def good_store(tmp_path, rng):
    return save_network(_net(rng, widths=(10, 8, 6, 3)), tmp_path / "m.zarr", chunk_edge=4)


def _fails(path, exc=StoreError, match=None):
    with pytest.raises(exc, match=match) as info:
        open_network(path)
    assert str(path) in str(info.value)
    # network_store_info (used by `info`) refuses the same store the same way.
    with pytest.raises(exc):
        network_store_info(path)
    return str(info.value)


def test_open_missing_and_non_stores(tmp_path):
    _fails(tmp_path / "nope.zarr", match="no such model store")
    f = tmp_path / "file.zarr"
    f.write_text("hello")
    _fails(f, match="not a zarr model store")
    d = tmp_path / "empty.zarr"
    d.mkdir()
    _fails(d, match="not a zarr v3 group")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=3)
    _fails(plain, match="not a recurjac-scale model store")
    arr = tmp_path / "array.zarr"
    zarr.create_array(str(arr), shape=(3,), dtype="f8")
    _fails(arr, match="not a")
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(str(v2), mode="w", zarr_format=2)
    _fails(v2, match="zarr v2")
    broken = tmp_path / "broken.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{ this is not json")
    _fails(broken, match="not a readable zarr v3 group")


def test_open_newer_format_version(good_store):
    _edit_attrs(good_store, lambda a: a.update(format_version=FORMAT_VERSION + 1))
    msg = _fails(good_store, match="newer")
    assert f"version {FORMAT_VERSION + 1}" in msg and "upgrade" in msg


@pytest.mark.parametrize("value", ["1", True, 0, None, 1.5])
def test_open_invalid_format_version(good_store, value):
    _edit_attrs(good_store, lambda a: a.update(format_version=value))
    _fails(good_store, match="format_version")


@pytest.mark.parametrize("member", ["layers/1/bias", "layers/2/weight", "layers/0", "layers"])
def test_open_missing_array(good_store, member):
    shutil.rmtree(good_store / member)
    _fails(good_store, match="missing")


def test_open_array_shape_disagrees_with_metadata(good_store):
    g = zarr.open_group(str(good_store), mode="r+")
    del g["layers/1/weight"]
    g["layers/1"].create_array("weight", shape=(6, 9), dtype="f8", chunks=(4, 4), fill_value=np.nan)[...] = 1.0
    _fails(good_store, match=r"layers/1/weight.*shape \(6, 9\)")


def test_open_bias_shape_and_dtype_disagree(good_store):
    g = zarr.open_group(str(good_store), mode="r+")
    del g["layers/0/bias"]
    g["layers/0"].create_array("bias", shape=(7,), dtype="f8")[...] = 0.0
    _fails(good_store, match="layers/0/bias")
    del g["layers/0/bias"]
    g["layers/0"].create_array("bias", shape=(8,), dtype="f4")[...] = 0.0
    _fails(good_store, match="dtype")


def test_open_widths_disagree(good_store):
    _edit_attrs(good_store, lambda a: a.update(widths=[10, 8, 5, 3]))
    _fails(good_store, match="shape")
    _edit_attrs(good_store, lambda a: a.update(widths=[10, 8, 6, 3], n_layers=2))
    _fails(good_store, match="n_layers")
    _edit_attrs(good_store, lambda a: a.update(n_layers=3, widths=[10, 8, -6, 3]))
    _fails(good_store, match="widths")


def test_open_input_metadata_disagrees(good_store):
    _edit_attrs(good_store, lambda a: a["input"].update(shape=[3, 4]))
    _fails(good_store, match="input shape")
    _edit_attrs(good_store, lambda a: a["input"].update(shape=[10], domain=[1.0, 0.0]))
    _fails(good_store, match="input metadata")


def test_open_extra_layer_group(good_store):
    zarr.open_group(str(good_store), mode="r+")["layers"].create_group("3")
    _fails(good_store, match="unexpected members")


@pytest.mark.parametrize(
    "spec, match",
    [({"name": "swishy"}, "unknown activation"), ({"name": "gelu"}, "Assumption 2"),
     ({"name": "leaky_relu", "alpha": -0.5}, "alpha"), ({"name": "relu", "beta": 3}, "bad parameters")],
)
def test_open_unknown_activation(good_store, spec, match):
    _edit_attrs(good_store, lambda a: a["activations"].__setitem__(1, spec))
    msg = _fails(good_store, exc=UnsupportedActivationError, match=match)
    assert "layer 1" in msg


def test_open_wrong_activation_count_and_output(good_store):
    _edit_attrs(good_store, lambda a: a.update(activations=["relu"]))
    _fails(good_store, match="activations")
    _edit_attrs(good_store, lambda a: a.update(activations=[{"name": "relu"}] * 2, output_activation={"name": "mish"}))
    _fails(good_store, exc=UnsupportedActivationError, match="output layer")


def test_open_bad_dtype_attribute(good_store):
    _edit_attrs(good_store, lambda a: a.update(dtype="int8"))
    _fails(good_store, match="dtype")


def test_corrupted_chunk_is_detected(good_store):
    chunk = good_store / "layers" / "0" / "weight" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    open_network(good_store)  # metadata is fine: opening is lazy
    with pytest.raises(StoreError, match=r"layers/0/weight.*cannot be read"):
        verify_network_store(good_store)


def test_verify_good_store(good_store):
    net = verify_network_store(good_store)
    assert net.widths == (10, 8, 6, 3)
