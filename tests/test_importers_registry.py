"""Importer registry: format from suffix, unknown formats, options, missing optional dependencies."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from recurjac_scale.errors import InputError, MissingDependencyError, ModelFormatError, RecurJacError
from recurjac_scale.network import Network
from recurjac_scale.network.importers import (
    IMPORTER_SUFFIXES,
    IMPORTERS,
    guess_format,
    import_network,
    register_importer,
)


def _npz(path, rng):
    np.savez(path, W0=rng.standard_normal((3, 4)), b0=np.zeros(3), W1=rng.standard_normal((2, 3)), b1=np.zeros(2),
             acts=np.array(["relu", "linear"]))
    return path


def test_registry_contents():
    assert set(IMPORTERS) >= {"onnx", "torch", "keras", "nnet", "npz"}
    expect = {".onnx": "onnx", ".pt": "torch", ".pth": "torch", ".h5": "keras", ".hdf5": "keras", ".nnet": "nnet",
              ".npz": "npz"}
    for sfx, fmt in expect.items():
        assert IMPORTER_SUFFIXES[sfx] == fmt
        assert guess_format(f"model{sfx.upper()}") == fmt


def test_unknown_suffix_and_format_list_accepted(tmp_path, rng):
    p = tmp_path / "model.xyz"
    p.write_bytes(b"abc")
    with pytest.raises(ModelFormatError) as ei:
        import_network(p)
    msg = str(ei.value)
    assert "model.xyz" in msg and all(f in msg for f in ("onnx", "torch", "keras", "nnet", "npz"))
    with pytest.raises(ModelFormatError, match="unknown model format 'caffe'.*onnx"):
        import_network(p, format="caffe")


def test_explicit_format_overrides_suffix(tmp_path, rng):
    p = _npz(tmp_path / "weights.npz", rng)
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(p.read_bytes())
    net = import_network(renamed, format="npz")
    assert isinstance(net, Network) and net.widths == (4, 3, 2)
    with pytest.raises(RecurJacError, match="weights.bin"):
        import_network(renamed, format="nnet")  # wrong format: a clean error, not a traceback


def test_options(tmp_path, rng):
    p = _npz(tmp_path / "m.npz", rng)
    assert import_network(p, layers=None).widths == (4, 3, 2)  # None options are ignored
    with pytest.raises(InputError, match="layers"):
        import_network(p, layers="relu,linear")


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="nothere.onnx"):
        import_network(tmp_path / "nothere.onnx")
    with pytest.raises(InputError):
        import_network(42)


def test_register_custom_importer(tmp_path, rng):
    @register_importer("testfmt", suffixes=(".tfmt",))
    def _imp(path, *, scale: float = 1.0):
        return Network([np.eye(2) * scale], [np.zeros(2)], [])

    try:
        p = tmp_path / "a.tfmt"
        p.write_text("x")
        assert np.array_equal(import_network(p, scale=2.0).weights[0], 2 * np.eye(2))
        assert guess_format(p) == "testfmt"
    finally:
        IMPORTERS.pop("testfmt", None)
        IMPORTER_SUFFIXES.pop(".tfmt", None)


@pytest.mark.parametrize(
    "module,fmt,extra,suffix",
    [("onnx", "onnx", "onnx", ".onnx"), ("torch", "torch", "torch", ".pth"), ("h5py", "keras", "keras", ".h5")],
)
def test_missing_dependency_names_the_extra(tmp_path, monkeypatch, module, fmt, extra, suffix):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    p = tmp_path / f"m{suffix}"
    p.write_bytes(b"\x00")
    with pytest.raises(MissingDependencyError) as ei:
        import_network(p, layers="linear") if fmt == "torch" else import_network(p)
    assert f"recurjac-scale[{extra}]" in str(ei.value)
