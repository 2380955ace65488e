"""``infiniteid inspect BUNDLE``: what a bundle holds, as tables.

Reads only the manifest and the file sizes (nothing is loaded into a backend), so
it also shows a bundle whose files are incomplete: missing files, and files whose size
differs from the manifest's record (truncated or replaced), are marked and listed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence

EPILOG = """\
examples:
  infiniteid inspect out/bundle
  infiniteid inspect out/bundle --json      # the manifest itself
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a bundle's manifest: components, tensors, files, scheduler, tools, engines",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", type=Path, help="bundle folder (with manifest.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of tables")
    p.set_defaults(run=run)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _dims(xs: Sequence[Any]) -> str:
    return "(" + ", ".join(str(x) for x in xs) + ")"


def _file_size(bundle: Path, rel: str, key: str, recorded: int = 0, differ: Optional[List[str]] = None) -> str:
    """The size of ``bundle/rel``; ``REFUSED`` when the path leads outside the bundle, ``MISSING``, or
    ``SIZE DIFFERS`` from the manifest's ``recorded`` bytes (0: not recorded); a refused, missing or
    differing file is appended to ``differ``."""
    from ..bundle import BundleError, inside_bundle

    try:
        path = inside_bundle(bundle, rel, key)
    except BundleError:
        if differ is not None:
            differ.append(f"{rel} (outside the bundle: refused)")
        return "REFUSED (outside the bundle)"
    if not path.is_file():
        if differ is not None:
            differ.append(f"{rel} (missing)")
        return "MISSING"
    size = path.stat().st_size
    if recorded and size != recorded:
        if differ is not None:
            differ.append(f"{rel} ({size} bytes, manifest {recorded})")
        return f"{human_size(size)} SIZE DIFFERS (manifest {human_size(recorded)})"
    return human_size(size)


def _face_models_line(fm: Any) -> str:
    """The manifest's face-model folder and whether the runtime follows it (a user path outside the bundle)."""
    from ..bundle import face_models_recorded_here

    if not fm:
        return "(none referenced; pass --face-models)"
    path = fm.get("path") if isinstance(fm, dict) else fm
    files = ", ".join(sorted((fm.get("files") or {}) if isinstance(fm, dict) else {})) or "no files recorded"
    if face_models_recorded_here(fm):
        rule = "recorded by an export on this machine: used unless --face-models is given"
    else:
        rule = "not recorded on this machine: not used; pass --face-models DIR (or trust_face_models=True in Python)"
    return f"{path} ({files}); a user folder outside the bundle, {rule}"


def _adapter_line(cfg: Any) -> str:
    """The ID module: its kind (infiniteid, ip-adapter-plus-face, ...) and token layout."""
    if not isinstance(cfg, dict):
        return "(not recorded)"
    keys = ("face_tokens", "clip_mapper", "cross_attention_dim", "clip_dim")
    return f"kind {cfg.get('kind', 'infiniteid')}, " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def engines(bundle: Path) -> List[List[str]]:
    """One row per ``engines/<target>/<component>.plan``, with what its JSON sidecar says."""
    rows: List[List[str]] = []
    root = bundle / "engines"
    if not root.is_dir():
        return rows
    from ..bundle import BundleError
    from ..trt.names import check_engine_folder

    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            check_engine_folder(bundle, folder)
        except BundleError:
            rows.append([folder.name, "REFUSED (leads outside the bundle)", "", "", "", ""])
            continue
        plans = sorted(p for p in folder.iterdir() if p.suffix == ".plan")
        if not plans:
            rows.append([folder.name, "(no plans)", "", "", "", ""])
        for plan in plans:
            side: dict = {}
            try:
                side = json.loads(plan.with_suffix(".json").read_text())
            except (OSError, ValueError):
                pass
            side = side if isinstance(side, dict) else {}
            rows.append([folder.name, plan.stem, human_size(plan.stat().st_size), str(side.get("precision", "?")),
                         str(side.get("tensorrt_version", "?")), str(side.get("created", "?"))])
    return rows


def render(bundle: Path, manifest: Any) -> str:
    m = manifest
    parts: List[str] = []
    parts.append(f"bundle     {bundle.resolve()}")
    parts.append(f"format     {m.format} v{m.format_version}" + (f", created {m.created}" if m.created else ""))
    model = ", ".join(f"{k}={v}" for k, v in sorted(m.model.items()) if not isinstance(v, (dict, list)))
    parts.append(f"model      {model}")
    parts.append(f"adapter    {_adapter_line(m.model.get('id_encoder'))}")
    res = ", ".join(f"{k}={v}" for k, v in sorted((m.resolution or {}).items()))
    parts.append(f"resolution {res}; max images per batch {m.max_images}")
    parts.append(f"face models {_face_models_line(m.face_models)}")

    comp_rows = []
    differ: List[str] = []
    for name, c in m.components.items():
        size = _file_size(bundle, c.file, f"components.{name}.file", c.size, differ)
        if c.external_data:
            size += f" + {_file_size(bundle, c.external_data, f'components.{name}.external_data', c.external_size, differ)} external"
        opts = ", ".join(f"{k}={v}" for k, v in sorted(c.options.items()) if not isinstance(v, (dict, list)))
        comp_rows.append([name, c.precision, c.file, size, c.sha256[:12], opts])
    parts += ["", "components", table(["name", "precision", "file", "size", "sha256", "options"], comp_rows)]
    for name, c in m.components.items():  # infiniteid calibrate's record of how a U-Net was quantized
        q = c.options.get("quantization")
        if isinstance(q, dict):
            parts.append(f"{name} quantization: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(q.items())))

    t_rows = []
    for name, c in m.components.items():
        for kind, tensors in (("in", c.inputs), ("out", c.outputs)):
            for t in tensors:
                t_rows.append([name, kind, t.name, t.dtype, _dims(t.shape), _dims(t.min), _dims(t.opt), _dims(t.max)])
    parts += ["", "tensors", table(["component", "io", "name", "dtype", "shape", "min", "opt", "max"], t_rows)]

    other = [[rel, _file_size(bundle, rel, f"tokenizers[{i}]", 0, differ)] for i, rel in enumerate(m.tokenizers)]
    parts += ["", "files", table(["file", "size"], other)]

    sched = ", ".join(f"{k}={v}" for k, v in sorted(m.scheduler_config.items()) if not k.startswith("_"))
    parts += ["", f"scheduler  {sched}"]
    if m.scheduler_override:
        parts.append("           (set at export over the base's: " + ", ".join(f"{k}={v}" for k, v in sorted(m.scheduler_override.items())) + ")")
    if m.loras:
        rows = [[x["file"], f"{x['scale']:g}", ", ".join(x["components"]), x["layers"], x["sha256"][:12]] for x in m.loras]
        parts += ["", "LoRAs fused at export", table(["file", "scale", "components", "layers", "sha256"], rows), ""]
    parts.append("tools      " + (", ".join(f"{k} {v}" for k, v in sorted(m.tools.items())) or "(none recorded)"))
    if m.sources:
        parts.append("sources")
        parts += [f"  {k}  {v}" for k, v in sorted(m.sources.items())]

    engine_rows = engines(bundle)
    parts.append("")
    if engine_rows:
        parts += ["engines", table(["folder", "plan", "size", "precision", "tensorrt", "built"], engine_rows)]
    else:
        parts.append("engines    none (build them on the target GPU with 'infiniteid build')")
    if differ:
        parts += ["", f"WARNING    {len(differ)} file(s) missing or not as the manifest records (truncated or replaced "
                      f"after export; the runtime refuses this bundle): {', '.join(differ)}"]
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    from ..bundle import read_manifest

    manifest = read_manifest(args.bundle)
    if args.json:
        print(manifest.to_json())
    else:
        print(render(args.bundle, manifest))
    return 0
