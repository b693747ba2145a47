"""``recurjac-scale info``: describe a model store without reading its weights."""

from __future__ import annotations

import argparse
import json

from ._common import add_model_argument

__all__ = ["register", "run", "format_info"]

_DESCRIPTION = """\
Describe a zarr model store: layers and widths, activations, parameter count, dtype, chunking and compression of
every array, size on disk, input metadata (shape, layout, domain box, normalisation) and provenance (source file,
its sha256, importer, creation time).  Only metadata is read, so this is instant even for a network larger than
memory.  MODEL may be 'default' for the bundled 64-32-32-10 digits model."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info",
        help="describe a model store (layers, activations, chunking, size, provenance)",
        description=_DESCRIPTION,
        epilog="examples:\n  recurjac-scale info default\n  recurjac-scale info mnist.zarr --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print the description as one JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..network.store_read import network_store_info

    if args.model == "default":
        from ..network.default import default_model_path

        path = default_model_path()
    else:
        path = args.model
    info = network_store_info(path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _act(spec: dict) -> str:
    spec = dict(spec or {"name": "identity"})
    name = spec.pop("name", "identity")
    if spec:
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.items())
        return f"{name}({inner})"
    return str(name)


def _stat(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        if len(v) <= 4:
            return "[" + ", ".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in v) + "]"
        return f"{len(v)} values"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _domain(dom) -> str:
    if dom is None:
        return "unbounded"
    lo, hi = dom
    if not isinstance(lo, list) and not isinstance(hi, list):
        return f"[{_stat(lo)}, {_stat(hi)}] for every coordinate"

    def rng(v):
        if not isinstance(v, list):
            return _stat(v)
        nums = [float(x) for x in v]
        return f"{min(nums):g}..{max(nums):g}"

    return f"per-coordinate box, lower {rng(lo)}, upper {rng(hi)}"


def format_info(info: dict) -> str:
    """Human-readable text of :func:`recurjac_scale.network.store.network_store_info`'s dict."""
    widths = info["widths"]
    inp = info["input"]
    lines = [
        f"model        {info['path']}",
        f"format       {info['format']} v{info['format_version']}, dtype {info['dtype']}",
        f"network      {'-'.join(map(str, widths))} ({len(widths) - 1} affine layers, "
        f"{info['n_parameters']:,} parameters)",
        f"activations  hidden: {', '.join(_act(a) for a in info['activations']) or 'none'}; "
        f"output: {_act(info['output_activation'])}",
        f"input        shape {tuple(inp['shape'])}, layout {inp['layout']}, domain {_domain(inp.get('domain'))}",
    ]
    if inp.get("mean") is not None or inp.get("std") is not None:
        lines.append(
            f"normalise    (x - mean) / std folded into layer 0; mean {_stat(inp.get('mean'))}, "
            f"std {_stat(inp.get('std'))}"
        )
    else:
        lines.append("normalise    none")
    lines.append("layers")
    row = "  {:>3}  {:>15}  {:<18} {:>15} {:>8}  {:>10}  {:>10}"
    header = row.format("k", "out x in", "activation", "weight chunks", "chunks", "stored", "logical")
    lines.append(header)
    for e in info["layers"]:
        w, b = e["weight"], e["bias"]
        shape = f"{w['shape'][0]} x {w['shape'][1]}"
        chunks = f"{w['chunks'][0]} x {w['chunks'][1]}"
        nch = f"{w['chunks_stored']}/{w['n_chunks']}"
        stored = _human(w["bytes_stored"] + b["bytes_stored"])
        logical = _human(w["bytes"] + b["bytes"])
        lines.append(row.format(e["index"], shape, _act(e["activation"]), chunks, nch, stored, logical))
    codecs = sorted({", ".join(e[n]["codecs"]) for e in info["layers"] for n in ("weight", "bias")})
    lines.append(f"codecs       {'; '.join(codecs)}")
    lines.append(
        f"size         {_human(info['bytes_on_disk'])} on disk, "
        f"{_human(info['bytes'])} of weights and biases uncompressed"
    )
    if not info.get("complete", True):
        missing = sum(
            e[n]["n_chunks"] - e[n]["chunks_stored"] for e in info["layers"] for n in ("weight", "bias")
        )
        lines.append(f"WARNING      {missing} chunk(s) missing: the store is incomplete (missing chunks read as NaN)")
    prov = info.get("provenance") or {}
    lines.append("provenance" + ("" if prov else "   none"))
    for k, v in prov.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v)
        lines.append(f"  {k + ':':<24} {v}")
    return "\n".join(lines)
