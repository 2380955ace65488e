"""LoRAs fused into the pipeline's weights with diffusers' own LoRA loading.

Published SDXL LoRAs (style LoRAs, few-step LoRAs such as SDXL-Lightning, Hyper-SD
and LCM-LoRA) come in two key layouts that diffusers reads:

* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and
  ``text_encoder.`` / ``text_encoder_2.`` for the two text encoders);
* kohya (sd-scripts, A1111): ``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; ``lora_te1_`` / ``lora_te2_`` for the text encoders.

:func:`fuse_loras` reads each file (``.safetensors`` through diffusers' loader, which
keeps the adapter metadata; torch pickles through
:func:`~infiniteid.model.weights_file.load_weights_file`, never unpickling code),
converts it with ``StableDiffusionXLPipeline.lora_state_dict``, checks that every
layer it names exists in this model with the right shape (a LoRA for another base
is refused with one line before anything is changed), then loads it with
``load_lora_weights``, fuses it at its scale with ``fuse_lora`` and unloads the
LoRA layers, leaving plain modules whose weights carry ``W + scale * delta``. The
graphs exported afterwards contain the fused weights and nothing else, so the
runtime and TensorRT pay nothing for a LoRA. A LoRA is applied to the text
encoders too when the file has layers for them.

Needs ``peft`` (diffusers' LoRA backend; in the ``export`` extra).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from ..bundle import file_digest
from .weights_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsFileError, flatten, load_weights_file

# The pipeline components a LoRA may touch, by the key prefix diffusers gives them.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_WHAT = {"unet": "U-Net", "text_encoder": "first text encoder", "text_encoder_2": "second text encoder"}


class LoraError(ValueError):
    """A LoRA file that is missing, unreadable, of an unknown layout, or made for another model."""


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:SCALE]``: a local LoRA file and the scale it is fused at."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``"style.safetensors"`` or ``"style.safetensors:0.8"``; the part after the last
        ``:`` is a scale only if it reads as a number (so ``C:\\loras\\x.safetensors`` works)."""
        head, sep, tail = str(text).rpartition(":")
        if sep and head:
            try:
                return cls(Path(head).expanduser(), float(tail))
            except ValueError:
                pass
        return cls(Path(text).expanduser())

    def validate(self) -> None:
        """Checks that need no model: the file exists, has a known type, the scale is finite."""
        if self.scale != self.scale or abs(self.scale) == float("inf"):
            raise LoraError(f"{self.path}: the LoRA scale must be a finite number, got {self.scale}")
        if self.path.is_dir():
            raise LoraError(f"{self.path} is a folder; give the LoRA weights file inside it")
        if not self.path.is_file():
            raise LoraError(f"LoRA file not found: {self.path}")
        if self.path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise LoraError(f"{self.path}: unknown LoRA file type {self.path.suffix!r}; expected .safetensors (or a torch .bin/.pt)")


@dataclass
class FusedLora:
    """What a bundle manifest (``loras[]``) and a generation record say about one fused LoRA."""

    file: str  # the file's name
    sha256: str
    scale: float
    components: List[str]  # the pipeline components it changed, e.g. ["unet", "text_encoder"]
    layers: int  # LoRA layers fused, all components together

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def fuse_loras(components: Any, loras: Sequence[LoraSpec]) -> List[FusedLora]:
    """Fuse each LoRA, in order, into ``components`` (a :class:`~infiniteid.model.pipeline.Components`).

    Every file is read and checked against the model before the first one is fused,
    so a bad file leaves the weights untouched. Returns one record per LoRA, also
    appended to ``components.loras``.
    """
    if not loras:
        return []
    for spec in loras:
        spec.validate()
    models = {name: getattr(components, name) for name in LORA_COMPONENTS}
    checked = []
    for spec in loras:
        source, state_dict = _read(spec.path, models["unet"])
        layers = check_fits(spec.path, state_dict, models)
        checked.append((spec, source, layers))
    pipe = _lora_pipeline(components)
    records = []
    for i, (spec, source, layers) in enumerate(checked):
        name = f"lora{i}"
        touched = [c for c in LORA_COMPONENTS if layers.get(c)]
        try:
            with _quiet_diffusers():  # it warns about every component a file has no layers for
                pipe.load_lora_weights(source, adapter_name=name, local_files_only=True)
                pipe.fuse_lora(components=touched, lora_scale=spec.scale, adapter_names=[name])
                pipe.unload_lora_weights()
        except (RuntimeError, ValueError, KeyError) as e:
            raise LoraError(f"{spec.path}: diffusers could not load this LoRA into the model ({_first_line(e)})") from None
        records.append(
            FusedLora(
                file=spec.path.name,
                sha256=file_digest(spec.path),
                scale=spec.scale,
                components=touched,
                layers=sum(layers.values()),
            )
        )
    components.loras = [*components.loras, *records]
    return records


# -- reading and checking ---------------------------------------------------------
def _read(path: Path, unet: nn.Module) -> Tuple[Union[str, Dict[str, Any]], Dict[str, Any]]:
    """(what to hand ``load_lora_weights``, the state dict converted to diffusers' keys).

    ``.safetensors`` goes to diffusers by path (its loader reads the adapter metadata
    in the header); a pickle is read here with the weights-only unpickler.
    """
    from diffusers import StableDiffusionXLPipeline

    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        _check_safetensors_header(path)
        source: Union[str, Dict[str, Any]] = str(path)
    else:
        try:
            source = flatten(load_weights_file(path))
        except WeightsFileError as e:
            raise LoraError(str(e)) from None
    try:
        state_dict, _alphas = StableDiffusionXLPipeline.lora_state_dict(
            dict(source) if isinstance(source, dict) else source, unet_config=unet.config, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, IndexError) as e:
        raise LoraError(f"{path}: not a LoRA diffusers can read ({_first_line(e)})") from None
    if not state_dict:
        raise LoraError(f"{path}: holds no tensors")
    return source, state_dict


def _check_safetensors_header(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for k in keys:  # reads every tensor: catches a truncated file here, with its name
                f.get_slice(k)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {_first_line(e)}") from None
    if not keys:
        raise LoraError(f"{path}: holds no tensors")


def _peft_keys(component: str, state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """This component's part of a converted LoRA state dict, keyed as peft names it
    (``<module>.lora_A.weight``): the conversions diffusers applies when loading."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    prefix = component + "."
    part = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return {}
    if component == "unet":
        return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):  # transformers 5 flattens CLIPTextModel
        part = {k.removeprefix("text_model."): v for k, v in part.items()}
    return part


def _layer_shape(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(inputs, outputs) of a layer a LoRA can adapt, or None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def check_fits(path: Path, state_dict: Dict[str, Any], models: Dict[str, nn.Module]) -> Dict[str, int]:
    """Every LoRA layer names a Linear/Conv2d of this model with matching widths.

    Returns the number of LoRA layers per component; raises :class:`LoraError` with
    one line (the first misfit, and how many there are) otherwise.
    """
    bad_keys = [k for k in state_dict if not k.startswith(tuple(c + "." for c in LORA_COMPONENTS)) or "lora" not in k]
    if bad_keys:
        raise LoraError(
            f"{path}: unknown key layout ({len(bad_keys)} of {len(state_dict)} keys, e.g. {bad_keys[0]!r}, are not "
            "SDXL LoRA layers in the diffusers/peft or kohya layout)"
        )
    counts: Dict[str, int] = {}
    for comp, model in models.items():
        part = _peft_keys(comp, state_dict, model)
        names = sorted({k.split(".lora_")[0] for k in part if ".lora_A." in k or ".lora_B." in k})
        misfits = list(_misfits(part, names, model))
        if misfits:
            raise LoraError(
                f"{path}: a LoRA for another model: {len(misfits)} of {len(names)} {_WHAT[comp]} layers do not fit "
                f"this one ({misfits[0]}); is it made for this base model?"
            )
        counts[comp] = len(names)
    if not any(counts.values()):
        raise LoraError(f"{path}: no LoRA layers for the U-Net or the text encoders")
    return counts


def _misfits(part: Dict[str, Any], names: Sequence[str], model: nn.Module) -> Iterator[str]:
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            yield f"{name!r} is not in it"
            continue
        shape = _layer_shape(module)
        if shape is None:
            yield f"{name!r} is a {type(module).__name__}, not a Linear or Conv2d layer"
            continue
        a, b = part.get(f"{name}.lora_A.weight"), part.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            yield f"{name!r} lacks its {'lora_A (down)' if a is None else 'lora_B (up)'} weight"
        elif a.shape[1] != shape[0] or b.shape[0] != shape[1]:
            yield f"{name!r} maps {a.shape[1]} -> {b.shape[0]} features, the layer {shape[0]} -> {shape[1]}"
        elif a.shape[0] != b.shape[1]:
            yield f"{name!r} has down rank {a.shape[0]} but up rank {b.shape[1]}"


# -- diffusers' loader --------------------------------------------------------------
def _lora_pipeline(components: Any):
    """A diffusers SDXL pipeline around our modules (shared, not copied): the object
    diffusers' ``load_lora_weights`` / ``fuse_lora`` / ``unload_lora_weights`` work on."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=None,
        tokenizer_2=None,
        unet=components.unet,
        scheduler=None,
        add_watermarker=False,
    )


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
