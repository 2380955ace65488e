"""Request bodies -> a checked request: JSON or multipart, faces decoded with guards.

Both body kinds carry the same fields (:class:`GenerateFields`); JSON adds
``faces`` as base64 strings, multipart sends one or more ``face`` files. Bodies
are read into memory up to a byte limit (never spooled to disk); a face image is
refused before decoding when its header declares more pixels than allowed (the
decompression-bomb guard), and only still-image formats are opened.

Errors are :class:`RequestError` with an HTTP status and the field at fault.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the ``field`` at fault, a one-line message."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.field = field

    def body(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"error": str(self)}
        if self.field:
            d["field"] = self.field
        return d


class GenerateFields(BaseModel):
    """What one image asks for. Batch settings (``steps``, ``height``, ``width``,
    ``scheduler``, the switches) decide which requests can share a batch."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="text prompt, e.g. 'a person in comic book style'")
    negative_prompt: str = ""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    guidance: float = Field(5.0, ge=1.0, le=50.0, description="CFG scale; 1 turns guidance off")
    id_scale: float = Field(1.0, ge=0.0, le=10.0)
    identity_mode: Literal["mix", "interpolate"] = "mix"
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="interpolation weight of the first face")
    steps: Optional[int] = Field(None, ge=1, le=1000)
    height: Optional[int] = Field(None, ge=1)
    width: Optional[int] = Field(None, ge=1)
    scheduler: Optional[Literal["ddim", "euler", "dpmpp_2m"]] = None
    mixed_attention: bool = True
    adain: bool = True


class GenerateJSON(GenerateFields):
    """The JSON body: the fields plus ``faces``, base64-encoded image files."""

    faces: List[str] = Field(min_length=1, description="face photos, base64 (PNG, JPEG, WebP or BMP)")


@dataclass
class ParsedRequest:
    fields: GenerateFields
    faces: List[np.ndarray]  # RGB uint8 (H, W, 3)


def _validation_error(e: ValidationError) -> RequestError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
    if err.get("type") == "extra_forbidden":
        return RequestError(422, f"unknown field {loc!r}", loc)
    return RequestError(422, f"{loc}: {err.get('msg')}", loc)


def check_fields(data: Dict[str, Any], model: type, max_prompt_chars: int) -> GenerateFields:
    try:
        fields = model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None
    for name in ("prompt", "negative_prompt"):
        n = len(getattr(fields, name))
        if n > max_prompt_chars:
            raise RequestError(422, f"{name} has {n} characters, the limit is {max_prompt_chars}", name)
    return fields


def decode_image(data: bytes, max_pixels: int, field: str = "face") -> np.ndarray:
    """Image file bytes -> RGB uint8. 413 past ``max_pixels`` (checked on the header,
    before decoding); 422 for anything that is not a PNG, JPEG, WebP or BMP image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(422, f"{field} is empty", field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise RequestError(413, f"{field} is {w}x{h} = {w * h} pixels, the limit is {max_pixels}", field)
                rgb = np.asarray(im.convert("RGB"))
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RequestError(413, f"{field} is too large to decode: {e}", field) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(422, f"{field} is not a readable image (PNG, JPEG, WebP or BMP): {type(e).__name__}", field) from None
    if min(rgb.shape[:2]) < 16:
        raise RequestError(422, f"{field} is {rgb.shape[1]}x{rgb.shape[0]}; a face photo needs at least 16 pixels a side", field)
    return rgb


def parse_json(body: bytes, max_pixels: int, max_prompt_chars: int, max_faces: int) -> ParsedRequest:
    import json

    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "the JSON body must be an object")
    if "faces" not in data:
        raise RequestError(422, "faces: a request needs at least one face image (base64)", "faces")
    fields = check_fields(data, GenerateJSON, max_prompt_chars)
    faces_b64 = fields.faces  # type: ignore[attr-defined]
    if len(faces_b64) > max_faces:
        raise RequestError(422, f"faces: {len(faces_b64)} faces, the limit is {max_faces}", "faces")
    faces = []
    for i, s in enumerate(faces_b64):
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"faces.{i} is not valid base64", f"faces.{i}") from None
        faces.append(decode_image(raw, max_pixels, f"faces.{i}"))
    plain = GenerateFields.model_validate(fields.model_dump(exclude={"faces"}))
    return ParsedRequest(plain, faces)


def split_multipart(body: bytes, content_type: str) -> Tuple[Dict[str, List[str]], List[Tuple[str, bytes]]]:
    """A multipart/form-data body (already in memory) -> (text fields, files as (field name, bytes))."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    texts: Dict[str, List[str]] = {}
    files: List[Tuple[str, bytes]] = []
    state: Dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            files.append((name, bytes(state["data"])))
        else:
            try:
                texts.setdefault(name, []).append(state["data"].decode("utf-8"))
            except UnicodeDecodeError:
                raise RequestError(422, f"{name} is not UTF-8 text", name) from None

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
                     on_header_end=on_header_end, on_part_data=on_part_data, on_part_end=on_part_end)
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except RequestError:
        raise
    except Exception as e:  # python-multipart raises its own parse errors
        raise RequestError(400, f"malformed multipart body: {e}") from None
    return texts, files


def parse_multipart(body: bytes, content_type: str, max_pixels: int, max_prompt_chars: int, max_faces: int) -> ParsedRequest:
    texts, files = split_multipart(body, content_type)
    for name, _ in files:
        if name != "face":
            raise RequestError(422, f"unknown file field {name!r}; face photos go in 'face'", name)
    data: Dict[str, Any] = {}
    for name, values in texts.items():
        if len(values) > 1:
            raise RequestError(422, f"field {name!r} is given {len(values)} times", name)
        data[name] = values[0]
    if "faces" in data:
        raise RequestError(422, "multipart requests send faces as 'face' files, not a 'faces' field", "faces")
    fields = check_fields(data, GenerateFields, max_prompt_chars)
    if not files:
        raise RequestError(422, "face: a request needs at least one face image file", "face")
    if len(files) > max_faces:
        raise RequestError(422, f"face: {len(files)} faces, the limit is {max_faces}", "face")
    return ParsedRequest(fields, [decode_image(b, max_pixels, "face") for _, b in files])
