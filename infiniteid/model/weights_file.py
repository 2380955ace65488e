"""Weights files are data: the one place the project reads adapter and LoRA weights.

Published face adapters and LoRAs come as ``.safetensors`` (a JSON header and raw
tensors: nothing in the file can run) or as torch pickles (``.bin``, ``.pt``,
``.pth``, ``.ckpt``). A pickle can name any Python callable and have it run on
load, so pickles are read only with ``torch.load(weights_only=True)``, whose
unpickler accepts tensors, plain containers and numbers and refuses everything
else. A file that needs more than that is refused with a one-line error, never
loaded with a laxer setting: convert it to ``.safetensors`` on a machine you trust.

Every adapter and LoRA loader in the project goes through :func:`load_weights_file`
for pickles; a test feeds it a pickle whose payload would run code and checks it is
refused. (LoRA ``.safetensors`` files are handed to diffusers' own LoRA loader, which
reads them with safetensors and keeps their adapter metadata: see :mod:`.lora`.)
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class WeightsFileError(ValueError):
    """A weights file that is missing, truncated, of an unknown type, or not plain data."""


def load_weights_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The file's contents as stored: a (possibly nested) dict of CPU tensors.

    ``.safetensors`` gives a flat ``{key: tensor}``; a torch pickle gives what was
    saved (published IP-Adapter ``.bin`` files hold ``{"image_proj": {...},
    "ip_adapter": {...}}``). Raises :class:`WeightsFileError` with one line naming
    the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsFileError(f"{path} is a folder; give the weights file inside it")
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise WeightsFileError(
        f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors or a torch pickle (.bin, .pt, .pth, .ckpt)"
    )


def _load_safetensors(path: Path) -> Dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsFileError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {_first_line(e)}") from None


def _load_pickle(path: Path) -> Dict[str, Any]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsFileError(
            f"{path} holds more than tensors (refused by the safe unpickler: {_first_line(e)}); "
            "nothing in it was run. Convert it to .safetensors on a machine you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise WeightsFileError(f"{path} is not a readable torch file (truncated or corrupt?): {_first_line(e)}") from None
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    """``{"a": {"b": t}}`` -> ``{"a.b": t}``: one key layout for pickles and safetensors."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        elif isinstance(v, torch.Tensor):
            out[key] = v
        else:
            raise WeightsFileError(f"entry {key!r} is a {type(v).__name__}, not a tensor")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
