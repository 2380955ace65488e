"""``infiniteid convert-adapter SRC --base SDXL --out FILE``: a published IP-Adapter face file to this project's adapter format.

Reads the published ``.bin`` (torch pickle, read with the safe unpickler) or
``.safetensors``, works out its kind from its keys (or takes ``--kind``), checks every
tensor against the SDXL U-Net, and writes one ``.safetensors`` in the adapter format
(version 2: the kind in the header, the ID projections keyed by processor name,
FaceID's in-file LoRA kept for fusing on load). Published files number their
cross-attention layers in the U-Net's processor order, so the conversion reads your
SDXL folder's ``unet/config.json`` (only that file: no weights are loaded).

``export --adapter`` also takes the published file directly; converting once gives
a smaller, pickle-free file whose kind is fixed.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

from ..cli import UserError
from ..model.kinds import AUTO, PUBLIC_KINDS

EPILOG = """\
examples:
  infiniteid convert-adapter ~/models/ip-adapter-plus-face_sdxl_vit-h.bin \\
      --base ~/models/sdxl-base-1.0 --out ~/models/plus-face.safetensors
  infiniteid convert-adapter ip-adapter-faceid-plusv2_sdxl.bin --base ~/models/sdxl-base-1.0 \\
      --out faceid-plusv2.safetensors --shortcut-scale 1.0
  infiniteid convert-adapter my-renamed-faceid-plus.bin --kind ip-adapter-faceid-plusv2 \\
      --base ~/models/sdxl-base-1.0 --out faceid-plusv2.safetensors

Kinds: ip-adapter-plus-face (CLIP ViT-H crop -> 16 tokens), ip-adapter-faceid-plusv2 and
ip-adapter-faceid-plus (ArcFace + CLIP crop -> 4 tokens; v1 and v2 share a key layout,
'auto' takes v2 when the file name says 'plusv2'), ip-adapter-faceid (ArcFace -> 4 tokens).
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert-adapter",
        help="convert a published IP-Adapter face file (.bin/.safetensors) to this project's adapter format",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="published adapter file (.bin or .safetensors)")
    p.add_argument("--base", type=Path, required=True, help="diffusers SDXL folder (only unet/config.json is read)")
    p.add_argument(
        "--kind", choices=(AUTO,) + PUBLIC_KINDS, default=AUTO, metavar="KIND", help="adapter kind (default: auto, from the file's keys and name)"
    )
    p.add_argument(
        "--shortcut-scale",
        type=float,
        default=1.0,
        help="FaceID-PlusV2's s_scale: tokens = x + s * perceiver(x) (default 1.0; other kinds ignore it)",
    )
    p.add_argument("--out", type=Path, required=True, help="adapter .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=run)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(args: argparse.Namespace) -> int:
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    if not src.is_file():
        raise UserError(f"adapter file not found: {src}")
    if out.suffix.lower() != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {out.name}")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    unet_config = Path(args.base).expanduser() / "unet" / "config.json"
    if not unet_config.is_file():
        raise UserError(f"--base: {unet_config} not found (give a diffusers SDXL folder)")

    from ..model.adapter import AdapterError, write_adapter
    from ..model.public_adapter import convert_public, describe, unet_from_config

    try:
        unet = unet_from_config(unet_config)
        cfg, tensors = convert_public(src, unet, args.kind, args.shortcut_scale)
    except AdapterError as e:
        raise UserError(str(e)) from None
    write_adapter(out, cfg, tensors, source=f"{src.name} sha256:{_sha256(src)}")
    print(f"{src.name}: {describe(cfg, tensors)}")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0
