"""Field types of a bundle manifest, checked before any dataclass is built.

A manifest is user-visible JSON that people edit, copy between machines and
sometimes break. :func:`manifest_problem` walks the parsed JSON against the
type hints of :class:`infiniteid.bundle.Manifest` (and, through them,
``ComponentSpec`` and ``TensorSpec``), so a field added to those dataclasses is
checked without a second list here. It returns the first problem as one line
that names the key by its path (``components.unet.inputs[5].max``), or ``None``.

The free-form ``model`` and ``resolution`` dicts get the keys the runtime reads
checked too (:data:`MODEL_FIELDS`, :data:`RESOLUTION_FIELDS`): an ``id_tokens``
of ``"abc"`` or a resolution ``min`` above its ``max`` is named here, not met
later as a traceback deep in generation.

Pure Python (no numpy): :mod:`infiniteid.bundle` calls it; it imports nothing
from the package.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, Optional, Tuple

_NONE = type(None)

#: keys of ``manifest.model`` the runtime reads, with their JSON types (checked when present)
MODEL_FIELDS: Dict[str, Any] = {
    "kind": str,
    "text_hidden": int,
    "text_hidden_2": int,
    "pooled_dim": int,
    "cross_attention_dim": int,
    "latent_channels": int,
    "face_embed_dim": int,
    "max_length": int,
    "id_tokens": int,
    "vae_scale_factor": int,
    "vae_scaling_factor": float,
    "resolution_multiple": int,
    "force_zeros_for_empty_prompt": bool,
    "id_encoder": Dict[str, Any],
    "clip_image": Dict[str, Any],
}

#: keys of ``manifest.model.clip_image``
CLIP_IMAGE_FIELDS: Dict[str, Any] = {
    "size": int,
    "mean": Tuple[float, float, float],
    "std": Tuple[float, float, float],
}

#: keys of ``manifest.face_models`` (the user's insightface folder); ``path`` is required
FACE_MODELS_FIELDS: Dict[str, Any] = {"path": str, "files": Dict[str, str]}

#: keys of ``manifest.resolution``; all are pixel counts, at least 1
RESOLUTION_FIELDS = ("multiple", "min", "max", "default_height", "default_width")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_ORDER = {bool: 0, int: 1, float: 2, str: 3}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return "any value"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if dataclasses.is_dataclass(hint):
        return "an object"
    if origin is typing.Union:  # in a fixed order: typing caches Union[int, str] and Union[str, int] as one
        options = sorted((a for a in args if a is not _NONE), key=lambda a: _ORDER.get(a, len(_ORDER)))
        return " or ".join(_type_name(a) for a in options) + (" or null" if _NONE in args else "")
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_plural(args[0])}"
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(hint, "items")


def _check(value: Any, hint: Any, path: str) -> Optional[str]:
    """The first problem of ``value`` against ``hint`` at ``path``, or ``None``."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _check_dataclass(value, hint, path)
    if origin is typing.Union:
        if value is None and _NONE in args:
            return None
        options = [a for a in args if a is not _NONE]
        if any(_check(value, a, path) is None for a in options):
            return None
        if len(options) == 1:  # Optional[X]: say what is wrong inside X
            return _check(value, options[0], path)
        return f"{path}: expected {_type_name(hint)}, got {_describe(value)}"
    ok: bool
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, list):
            return f"{path}: expected {_type_name(hint)}, got {_describe(value)}"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"{path}: expected {_type_name(hint)}, got {_describe(value)}"
            items = list(zip(value, args))
        else:
            item = args[0] if args else Any
            items = [(v, item) for v in value]
        for i, (v, h) in enumerate(items):
            problem = _check(v, h, f"{path}[{i}]")
            if problem:
                return problem
        return None
    elif origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"{path}: expected an object, got {_describe(value)}"
        vhint = args[1] if args else Any
        for k, v in value.items():
            problem = _check(v, vhint, f"{path}.{k}")
            if problem:
                return problem
        return None
    else:  # a hint this checker does not know: accept (the dataclass will take it as is)
        return None
    return None if ok else f"{path}: expected {_type_name(hint)}, got {_describe(value)}"


def _check_dataclass(value: Any, cls: Any, path: str) -> Optional[str]:
    if not isinstance(value, dict):
        return f"{path}: expected an object, got {_describe(value)}"
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            return f"{path}: unknown key {key!r}"
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if name not in value:
            if required:
                return f"{path}: missing key {name!r}"
            continue
        problem = _check(value[name], hints[name], f"{path}.{name}" if path else name)
        if problem:
            return problem
    return None


def _check_known_keys(d: Dict[str, Any], spec: Dict[str, Any], path: str) -> Optional[str]:
    for key, hint in spec.items():
        if key in d:
            problem = _check(d[key], hint, f"{path}.{key}")
            if problem:
                return problem
    return None


def _positive(value: Any, path: str) -> Optional[str]:
    return None if value >= 1 else f"{path}: must be at least 1, got {value}"


def manifest_problem(d: Dict[str, Any], manifest_cls: Any) -> Optional[str]:
    """The first type or range problem of the parsed manifest ``d``, as ``"key.path: what"``; else ``None``.

    ``manifest_cls`` is :class:`infiniteid.bundle.Manifest` (passed in so this module
    imports nothing from the package).
    """
    problem = _check_dataclass(d, manifest_cls, "")
    if problem:
        return problem.lstrip(": ")
    for name, comp in d["components"].items():
        for kind in ("inputs", "outputs"):
            for i, t in enumerate(comp[kind]):
                if len(t["shape"]) != len(t["min"]) or len(t["min"]) != len(t["opt"]) or len(t["opt"]) != len(t["max"]):
                    return f"components.{name}.{kind}[{i}]: shape, min, opt and max must have the same length"
    model = d["model"]
    problem = _check_known_keys(model, MODEL_FIELDS, "model")
    if problem:
        return problem
    if isinstance(model.get("clip_image"), dict):
        problem = _check_known_keys(model["clip_image"], CLIP_IMAGE_FIELDS, "model.clip_image")
        if problem:
            return problem
    for key in ("id_tokens", "max_length", "vae_scale_factor", "resolution_multiple"):
        if key in model:
            problem = _positive(model[key], f"model.{key}")
            if problem:
                return problem
    fm = d.get("face_models")
    if fm is not None:
        if "path" not in fm:
            return "face_models: missing key 'path'"
        problem = _check_known_keys(fm, FACE_MODELS_FIELDS, "face_models")
        if problem:
            return problem
    res = d["resolution"]
    for key in RESOLUTION_FIELDS:
        if key in res:
            problem = _positive(res[key], f"resolution.{key}")
            if problem:
                return problem
    if "min" in res and "max" in res and res["min"] > res["max"]:
        return f"resolution: min {res['min']} is above max {res['max']}"
    return _positive(d["max_images"], "max_images")
