"""Paths named inside user-given files never lead out of their folder.

For each reader of a file that can name other files, a crafted file naming ``../outside/...``, an absolute path,
and a symlink (inside the folder) that leads out is refused or ignored, and the outside file is never opened:

- engine checkpoint records (the chunk files of their ``sha256`` map): the record counts as damaged;
- ONNX external data (``location``): refused before loading;
- Keras HDF5 (external links, external and virtual dataset storage): refused before the other file is opened.

Formats that hold no paths (VNN-LIB, the batch JSON-lines store, the branch-and-bound checkpoint) are read with
path-like strings planted in them, and no file outside is opened (Python's ``open`` audit events).
"""

from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from recurjac_scale.errors import InputError
from recurjac_scale.testing import random_network

_SEEN: dict = {"opened": None}


def _audit(event, args):
    if event == "open" and _SEEN["opened"] is not None and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _SEEN["opened"].append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


@contextmanager
def opened_files():
    """The files Python opens (``open``/``os.open`` audit events) within the block, as real paths."""
    seen: list = []
    _SEEN["opened"] = seen
    try:
        yield seen
    finally:
        _SEEN["opened"] = None


def _output_names(opened, folder):
    """Names of the files opened inside ``folder``, each fresh temporary file of `write_atomic` (``.NAME.*.tmp``)
    counted as NAME."""
    names = {Path(p).name for p in opened if Path(p).is_relative_to(folder.resolve())}
    return {n[1:-4].rsplit(".", 1)[0] if n.startswith(".") and n.endswith(".tmp") else n
            for n in names}


@pytest.fixture
def bait(tmp_path):
    """``(folder, outside)``: ``folder/link`` is a symlink to ``outside``, which holds ``secret.bin``."""
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    (folder / "link").symlink_to(outside)
    return folder, outside


def _escapes(folder: Path, outside: Path, name: str) -> dict:
    """The three escaping spellings of ``outside/name`` as seen from a file in ``folder``."""
    return {"dotdot": f"../{outside.name}/{name}", "absolute": str(outside / name), "symlink": f"link/{name}"}


def _never_opened(opened, outside: Path) -> None:
    inside = [p for p in opened if Path(p).is_relative_to(outside.resolve())]
    assert not inside, f"opened outside the folder: {inside}"


# -- engine checkpoint records --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_checkpoint_record_naming_a_file_outside_is_damaged(tmp_path, kind):
    from recurjac_scale.engine import plan_jacobian
    from recurjac_scale.engine.checkpoint import Checkpoint, _record_digest

    rng = np.random.default_rng(0)
    net = random_network([5, 6, 3], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 5)
    plan = plan_jacobian(net, x0, 0.05, math.inf, "recurjac-b", layer_bounds="ibp", row_block=3, col_block=3,
                         memory_budget="1GiB")
    ck = tmp_path / "ck"
    outside = tmp_path / "outside"
    outside.mkdir()
    plan.compute(checkpoint=ck, scheduler="synchronous", durable=False)
    cp = Checkpoint(Path(ck), plan.job_id)
    key, rec = next(iter(sorted(cp.finished().items())))
    assert cp.check_record(rec) is None
    # the record now names a copy of one of its own chunks, placed outside with a matching checksum
    rel, digest = next(iter(rec["sha256"].items()))
    (outside / "chunk").write_bytes((ck / rel).read_bytes())
    (ck / "link").symlink_to(outside)
    bad = _escapes(ck, outside, "chunk")[kind]
    rec["sha256"] = {bad: digest}
    rec["record_sha256"] = _record_digest(rec)
    cp._record_path(*key).write_text(json.dumps(rec))
    logs: list = []
    with opened_files() as opened:
        kept = cp.verified(log=logs.append)
    assert key not in kept
    assert len(logs) == 1 and "outside the checkpoint" in logs[0] and repr(bad) in logs[0]
    assert ("is absolute" if kind == "absolute" else "leaves the folder") in logs[0]
    _never_opened(opened, outside)


# -- ONNX external data ---------------------------------------------------------------------------------------


def _onnx_with_external(path: Path, location: str) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((3, 2), np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "24")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save(helper.make_model(g), str(path))


def test_onnx_external_data_inside_the_folder_loads(bait):
    from recurjac_scale.network.importers import import_network

    folder, _outside = bait
    (folder / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    _onnx_with_external(folder / "m.onnx", "w.bin")
    net = import_network(folder / "m.onnx")
    assert np.array_equal(net.weights[0], np.arange(6, dtype=np.float32).reshape(3, 2).T)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_onnx_external_data_outside_the_folder_is_refused(bait, kind):
    from recurjac_scale.network.importers import import_network

    folder, outside = bait
    loc = _escapes(folder, outside, "secret.bin")[kind]
    _onnx_with_external(folder / "m.onnx", loc)
    with opened_files() as opened, pytest.raises(InputError) as ei:
        import_network(folder / "m.onnx")
    msg = str(ei.value)
    assert "\n" not in msg and repr(loc) in msg and str(folder.resolve()) in msg
    _never_opened(opened, outside)


# -- Keras HDF5 -----------------------------------------------------------------------------------------------


def _keras_file(path: Path, kernel_writer) -> None:
    """A one-Dense-layer Keras 2 file whose kernel dataset is made by ``kernel_writer(layer_group, name)``."""
    h5py = pytest.importorskip("h5py")
    cfg = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "dense_1", "units": 2, "activation": "linear", "use_bias": True,
                                           "batch_input_shape": [None, 3]}}]}}
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = "2.2.4"
        f.attrs["model_config"] = json.dumps(cfg)
        lg = f.create_group("model_weights").create_group("dense_1")
        lg.attrs["weight_names"] = ["dense_1/kernel:0", "dense_1/bias:0"]
        sub = lg.create_group("dense_1")
        kernel_writer(sub, "kernel:0")
        sub.create_dataset("bias:0", data=np.zeros(2, np.float32))


def test_keras_plain_file_loads(bait):
    from recurjac_scale.network.importers import import_network

    folder, _ = bait
    _keras_file(folder / "m.h5", lambda g, n: g.create_dataset(n, data=np.ones((3, 2), np.float32)))
    assert np.array_equal(import_network(folder / "m.h5").weights[0], np.ones((2, 3)))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("how", ["external_link", "external_storage", "virtual"])
def test_keras_data_in_other_files_is_refused(bait, kind, how):
    h5py = pytest.importorskip("h5py")
    from recurjac_scale.network.importers import import_network

    folder, outside = bait
    with h5py.File(outside / "w.h5", "w") as f:
        f.create_dataset("kernel", data=np.full((3, 2), 7.0, np.float32))
    target = _escapes(folder, outside, "w.h5" if how != "external_storage" else "secret.bin")[kind]

    def writer(g, name):
        if how == "external_link":
            g[name] = h5py.ExternalLink(target, "/kernel")
        elif how == "external_storage":
            g.create_dataset(name, shape=(3, 2), dtype=np.float32, external=[(target, 0, 24)])
        else:
            layout = h5py.VirtualLayout(shape=(3, 2), dtype=np.float32)
            layout[:] = h5py.VirtualSource(target, "kernel", shape=(3, 2))
            g.create_virtual_dataset(name, layout)

    _keras_file(folder / "m.h5", writer)
    cwd = os.getcwd()
    os.chdir(folder)  # HDF5 resolves external storage against the working directory
    try:
        with pytest.raises(InputError) as ei:
            import_network(folder / "m.h5")
    finally:
        os.chdir(cwd)
    msg = str(ei.value)
    assert "\n" not in msg and "m.h5" in msg
    assert (repr(target) in msg) if how == "external_link" else ("external or virtual storage" in msg)


# -- formats that hold no paths -------------------------------------------------------------------------------


def test_vnnlib_names_no_files(bait):
    from recurjac_scale.applications.inputs import read_vnnlib_box

    folder, outside = bait
    spell = _escapes(folder, outside, "secret.bin")
    text = "".join(f"; include {s}\n(declare-const X_{i} Real)\n(assert (<= X_{i} 1.0))\n(assert (>= X_{i} 0.0))\n"
                   for i, s in enumerate(spell.values()))
    text += "".join(f'(include "{s}")\n(load "{s}")\n' for s in spell.values())
    (folder / "p.vnnlib").write_text(text)
    with opened_files() as opened:
        lo, hi = read_vnnlib_box(str(folder / "p.vnnlib"), 3)
    assert lo.tolist() == [0.0] * 3 and hi.tolist() == [1.0] * 3
    assert set(opened) == {str((folder / "p.vnnlib").resolve())}


def test_batch_store_paths_are_never_followed(bait):
    from recurjac_scale.applications.batch import BatchJob, record_checksum, run_batch

    folder, outside = bait
    rng = np.random.default_rng(1)
    net = random_network([4, 5, 3], "relu", rng)
    x = rng.uniform(-0.5, 0.5, (2, 4))
    opts = dict(p=math.inf, method="fastlip", layer_bounds="ibp", search="grid", margin_bound=False, seed=0)
    job = BatchJob("certify", net, x, None, (0, 1), ("runnerup",), opts)
    out = folder / "c.jsonl"
    first = run_batch(job, out, scheduler="synchronous")
    spell = list(_escapes(folder, outside, "secret.bin").values())
    lines = [json.loads(s) for s in out.read_text().splitlines()]
    lines[0]["job"].update(model=spell[0], inputs=spell[1], box_source=spell[2])
    for rec in lines[1:-1]:
        rec.update(model=spell[0], plot=spell[1], store=spell[2])
        rec["checksum"] = record_checksum(rec)
    out.write_text("".join(json.dumps(d) + "\n" for d in lines[:-1]))
    with opened_files() as opened:
        again = run_batch(job, out, scheduler="synchronous")
    assert again.reused == len(first.records) and again.computed == 0
    _never_opened(opened, outside)
    assert _output_names(opened, folder) <= {"c.jsonl"}


def test_bab_checkpoint_paths_are_never_followed(bait):
    import hashlib

    from recurjac_scale.bab.search import bab_lipschitz

    folder, outside = bait
    rng = np.random.default_rng(2)
    net = random_network([3, 6, 2], "relu", rng)
    x0 = rng.uniform(-0.5, 0.5, 3)
    kw = dict(outputs=0, time_budget=30, gap=0.0, parts_per_task=2, scheduler="synchronous", dives=False)
    ck = folder / "bab.json"
    bab_lipschitz(net, x0, 0.3, "inf", max_rounds=1, checkpoint=ck, **kw)
    doc = json.loads(ck.read_text())
    spell = list(_escapes(folder, outside, "secret.bin").values())
    doc["state"].update(model=spell[0], checkpoint=spell[1], frontier_file=spell[2])
    body = json.dumps(doc["state"], sort_keys=True, separators=(",", ":"))
    doc["sha256"] = hashlib.sha256(body.encode()).hexdigest()
    ck.write_text(json.dumps(doc))
    with opened_files() as opened:
        res = bab_lipschitz(net, x0, 0.3, "inf", max_rounds=2, checkpoint=ck, **kw)
    assert res.resumed
    _never_opened(opened, outside)
    assert _output_names(opened, folder) <= {"bab.json"}
