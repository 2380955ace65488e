"""The generated test world: drawn people whose identity is a few visible attributes.

A *person* (:class:`Identity`) is skin tone, face shape, hair colour and style,
eye colour and glasses. A *scene* (:class:`Scene`) is what a prompt controls:
background, clothing colour and lighting. :func:`render` draws a person in a
scene (numpy + PIL only), :func:`caption` writes the prompt that describes it in
words the tiny tokenizer knows, and :func:`measure` reads every attribute back
from an image (of any size) by looking at the places the drawing puts them, so
the evaluation can score generated images: identity attributes against the
reference person's, scene attributes against the prompt's.

The head always fills the middle half of the square picture: the box that the
synthetic face detector of :mod:`infiniteid.face.synthetic` is scripted with
(``DEFAULT_FACES``), so the project's face front end finds and aligns these
faces exactly as it does a real photo with a real detector.
:func:`write_world` writes one folder per identity (``photo.png`` +
``photo.txt`` caption), the training layout of :mod:`infiniteid.training.data`,
plus ``world.json`` with every photo's attributes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

RGB = Tuple[int, int, int]

SKIN: Dict[str, RGB] = {"pale": (246, 214, 190), "tan": (206, 150, 104), "brown": (141, 85, 56), "dark": (74, 44, 30)}
HAIR: Dict[str, RGB] = {"black": (24, 22, 24), "blonde": (232, 200, 90), "red": (178, 56, 20)}
EYES: Dict[str, RGB] = {"blue": (40, 110, 230), "green": (40, 170, 60), "brown": (110, 60, 20)}
FACE_SHAPES = ("round", "long", "square")
HAIR_STYLES = ("short", "long", "bald")

BACKGROUND: Dict[str, RGB] = {"city": (128, 128, 140), "forest": (40, 120, 50), "beach": (240, 220, 150),
                              "snow": (235, 240, 250)}
CLOTHING: Dict[str, RGB] = {"red": (210, 30, 30), "blue": (30, 60, 210), "green": (30, 170, 60)}
LIGHTING: Dict[str, Tuple[float, float, float]] = {"day": (1.0, 1.0, 1.0), "night": (0.35, 0.4, 0.65),
                                                     "sunset": (1.0, 0.7, 0.5)}
_LIGHT_WORDS = {"day": "", "night": " at night", "sunset": " at sunset"}

IDENTITY_ATTRIBUTES = ("skin", "face_shape", "hair_colour", "hair_style", "eyes", "glasses")
SCENE_ATTRIBUTES = ("background", "clothing", "lighting")


@dataclass(frozen=True)
class Identity:
    skin: str
    face_shape: str
    hair_colour: str
    hair_style: str
    eyes: str
    glasses: bool

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Identity":
        pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]  # noqa: E731
        return cls(pick(SKIN), pick(FACE_SHAPES), pick(HAIR), pick(HAIR_STYLES), pick(EYES), bool(rng.random() < 0.5))


@dataclass(frozen=True)
class Scene:
    background: str = "city"
    clothing: str = "blue"
    lighting: str = "day"

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Scene":
        pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]  # noqa: E731
        return cls(pick(BACKGROUND), pick(CLOTHING), pick(LIGHTING))


def caption(scene: Scene) -> str:
    """The prompt of a scene, e.g. ``a photo of a person wearing a red jacket in the forest at night``."""
    return f"a photo of a person wearing a {scene.clothing} jacket in the {scene.background}{_LIGHT_WORDS[scene.lighting]}"


def parse_caption(text: str) -> Optional[Scene]:
    """The scene a caption or prompt names (None when it names none of the world's words)."""
    words = text.lower().replace(",", " ").split()
    find = lambda opts, default: next((o for o in opts if o in words), default)  # noqa: E731
    bg, cl = find(BACKGROUND, None), find(CLOTHING, None)
    light = "night" if "night" in words else "sunset" if "sunset" in words else "day"
    if bg is None or cl is None:
        return None
    return Scene(bg, cl, light)


# -- drawing ------------------------------------------------------------------------
# Geometry in fractions of the picture side; the head box is [0.25, 0.75]^2.
_HEAD = {"round": (0.27, 0.27, 0.73, 0.75), "long": (0.33, 0.25, 0.67, 0.75), "square": (0.29, 0.28, 0.71, 0.74)}
_EYES = ((0.42, 0.46), (0.58, 0.46))
_EYE_R = 0.035


def _lit(c: RGB, light: str) -> RGB:
    t = LIGHTING[light]
    return tuple(int(round(v * k)) for v, k in zip(c, t))  # type: ignore[return-value]


def render(identity: Identity, scene: Scene, size: int = 128, jitter: float = 0.0,
           rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The person in the scene, RGB uint8 ``(size, size, 3)``. ``jitter`` (pixels, as a
    fraction of the side) shifts the drawing a little, so photos of one person differ."""
    from PIL import Image, ImageDraw

    s = size * 4  # draw at 4x, then downsample (anti-aliasing)
    dx, dy = (rng.uniform(-jitter, jitter, 2) if rng is not None and jitter else (0.0, 0.0))
    xy = lambda *v: [(v[i] + (dx if i % 2 == 0 else dy)) * s for i in range(len(v))]  # noqa: E731
    lit = lambda c: _lit(c, scene.lighting)  # noqa: E731
    im = Image.new("RGB", (s, s), lit(BACKGROUND[scene.background]))
    d = ImageDraw.Draw(im)
    if scene.background == "city":  # buildings
        for x0, top in ((0.0, 0.15), (0.8, 0.05)):
            d.rectangle(xy(x0, top, x0 + 0.2, 1.0), fill=lit((90, 90, 104)))
    elif scene.background == "forest":
        for x0 in (0.05, 0.85):
            d.polygon(xy(x0 + 0.05, 0.1, x0 - 0.05, 0.6, x0 + 0.15, 0.6), fill=lit((20, 80, 30)))
    d.rectangle(xy(0.15, 0.8, 0.85, 1.0), fill=lit(CLOTHING[scene.clothing]))  # jacket
    d.rectangle(xy(0.44, 0.72, 0.56, 0.82), fill=lit(SKIN[identity.skin]))  # neck
    hair = lit(HAIR[identity.hair_colour])
    x0, y0, x1, y1 = _HEAD[identity.face_shape]
    if identity.hair_style == "long":
        d.rectangle(xy(x0 - 0.04, y0 + 0.02, x1 + 0.04, 0.8), fill=hair)
    skin = lit(SKIN[identity.skin])
    if identity.face_shape == "square":
        d.rounded_rectangle(xy(x0, y0, x1, y1), radius=0.04 * s, fill=skin)
    else:
        d.ellipse(xy(x0, y0, x1, y1), fill=skin)
    if identity.hair_style != "bald":
        d.chord(xy(x0 - 0.01, y0 - 0.03, x1 + 0.01, y0 + 0.22), 180, 360, fill=hair)
    for ex, ey in _EYES:
        d.ellipse(xy(ex - 0.05, ey - 0.035, ex + 0.05, ey + 0.035), fill=lit((250, 250, 250)))
        d.ellipse(xy(ex - _EYE_R, ey - _EYE_R, ex + _EYE_R, ey + _EYE_R), fill=lit(EYES[identity.eyes]))
    if identity.glasses:
        frame = lit((10, 10, 10))
        for ex, ey in _EYES:
            d.rectangle(xy(ex - 0.075, ey - 0.06, ex + 0.075, ey + 0.06), outline=frame, width=max(1, int(0.025 * s)))
        d.line(xy(0.47, 0.46, 0.53, 0.46), fill=frame, width=max(1, int(0.04 * s)))
    d.line(xy(0.5, 0.5, 0.48, 0.58, 0.52, 0.58), fill=lit((120, 70, 50)), width=max(1, int(0.012 * s)))  # nose
    d.arc(xy(0.43, 0.58, 0.57, 0.68), 20, 160, fill=lit((150, 40, 50)), width=max(1, int(0.015 * s)))  # mouth
    return np.asarray(im.resize((size, size), Image.LANCZOS), dtype=np.uint8)


# -- measuring ----------------------------------------------------------------------

def _patch(img: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    h, w = img.shape[:2]
    x0, x1 = int(max(0, (cx - r) * w)), int(min(w, np.ceil((cx + r) * w)))
    y0, y1 = int(max(0, (cy - r) * h)), int(min(h, np.ceil((cy + r) * h)))
    return img[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].reshape(-1, 3).astype(np.float32)


def _nearest(colour: np.ndarray, palette: Dict[str, RGB], light: str) -> str:
    return min(palette, key=lambda k: float(np.sum((colour - np.array(_lit(palette[k], light))) ** 2)))


def measure(img: np.ndarray) -> Dict[str, object]:
    """Every attribute read back from an RGB image of the world (any square size)."""
    img = np.asarray(img)
    med = lambda *a: np.median(_patch(img, *a), axis=0)  # noqa: E731
    dist = lambda a, b: float(np.sum((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2))  # noqa: E731
    bg = np.mean([med(0.08, 0.05, 0.04), med(0.92, 0.05, 0.04), med(0.08, 0.7, 0.04), med(0.92, 0.7, 0.04)], axis=0)
    cloth = np.mean([med(0.25, 0.92, 0.05), med(0.75, 0.92, 0.05)], axis=0)
    # Lighting, background and clothing jointly: the combination closest to what is seen.
    light, background, clothing = min(
        ((li, b, c) for li in LIGHTING for b in BACKGROUND for c in CLOTHING),
        key=lambda t: dist(bg, _lit(BACKGROUND[t[1]], t[0])) + dist(cloth, _lit(CLOTHING[t[2]], t[0])))
    skin_c = np.mean([med(0.38, 0.6, 0.025), med(0.62, 0.6, 0.025)], axis=0)
    skin = _nearest(skin_c, SKIN, light)
    hair_lit = {k: _lit(v, light) for k, v in HAIR.items()}
    # Beside the neck: long hair, else background. On top of the head: hair, else bald skin.
    side = np.mean([med(0.36, 0.77, 0.015), med(0.64, 0.77, 0.015)], axis=0)
    top = med(0.5, 0.32, 0.02)
    side_k = min([*hair_lit, "_bg"], key=lambda k: dist(side, bg if k == "_bg" else hair_lit[k]))
    top_k = min([*hair_lit, "_skin"], key=lambda k: dist(top, skin_c if k == "_skin" else hair_lit[k]))
    hair_style = "long" if side_k != "_bg" else "short" if top_k != "_skin" else "bald"
    hair_colour = side_k if hair_style == "long" else top_k if hair_style == "short" else "none"
    eyes = _nearest(np.mean([med(x, y, 0.012) for x, y in _EYES], axis=0), EYES, light)
    glasses = bool(dist(med(0.5, 0.46, 0.01), _lit((10, 10, 10), light)) < dist(med(0.5, 0.46, 0.01), skin_c))
    # Face shape: skin in the head box's lower corners (square), at the box's sides (round), or neither (long).
    corner = np.mean([med(0.31, 0.71, 0.01), med(0.69, 0.71, 0.01)], axis=0)
    mid_side = np.mean([med(0.305, 0.55, 0.01), med(0.695, 0.55, 0.01)], axis=0)
    near_skin = lambda c: dist(c, skin_c) < min(dist(c, bg), *(dist(c, h) for h in hair_lit.values()))  # noqa: E731
    face_shape = "square" if near_skin(corner) else "round" if near_skin(mid_side) else "long"
    return {"skin": skin, "face_shape": face_shape, "hair_colour": hair_colour, "hair_style": hair_style,
            "eyes": eyes, "glasses": glasses, "background": background, "clothing": clothing, "lighting": light}


def expected(identity: Identity, scene: Scene) -> Dict[str, object]:
    """What :func:`measure` should read from ``render(identity, scene)``."""
    d = {**asdict(identity), **asdict(scene)}
    if identity.hair_style == "bald":
        d["hair_colour"] = "none"
    return d


def attribute_accuracy(measured: Sequence[Dict[str, object]], wanted: Sequence[Dict[str, object]],
                       keys: Sequence[str]) -> float:
    """Fraction of (image, attribute) pairs where the measurement equals the wanted value."""
    hits = [m[k] == w[k] for m, w in zip(measured, wanted) for k in keys]
    return float(np.mean(hits)) if hits else float("nan")


# -- writing --------------------------------------------------------------------------

def write_world(folder, identities: int = 8, photos: int = 4, size: int = 128, seed: int = 0,
                jitter: float = 0.01, exclude: Sequence[Identity] = ()) -> Path:
    """``folder/<person-NN>/<k>.png`` + ``.txt`` captions, and ``folder/world.json``.
    ``exclude``: people never drawn (e.g. a training world's, so that a held-out set is new)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    left = distinct_identities() - len(set(exclude))
    if identities > left:
        raise ValueError(f"the world draws {left} people besides the excluded ones; {identities} asked")
    people: List[Identity] = []
    while len(people) < identities:  # distinct people
        p = Identity.random(rng)
        if p not in people and p not in exclude:
            people.append(p)
    records = []
    for i, person in enumerate(people):
        d = folder / f"person-{i:02d}"
        d.mkdir(exist_ok=True)
        for k in range(photos):
            scene = Scene.random(rng)
            name = d / f"{k}.png"
            Image.fromarray(render(person, scene, size, jitter, rng)).save(name)
            name.with_suffix(".txt").write_text(caption(scene) + "\n")
            records.append({"path": str(name.relative_to(folder)), "identity": asdict(person), "scene": asdict(scene)})
    (folder / "world.json").write_text(json.dumps({"size": size, "seed": seed, "photos": records}, indent=1))
    return folder


def distinct_identities() -> int:
    """How many different people the world can draw."""
    return len(SKIN) * len(FACE_SHAPES) * len(HAIR) * len(HAIR_STYLES) * len(EYES) * 2


def identity_chance() -> Dict[str, float]:
    """Per identity attribute, the accuracy of an image that ignores the reference:
    ``sum_v p(v)^2`` over the world's people (what :func:`expected` reads, so a bald
    person's hair colour is ``"none"``), i.e. the chance that two independent people
    agree; ``"mean"`` is the identity accuracy's chance level (about 1/3). An image
    always drawing the commonest value scores ``max_v p(v)`` instead (mean 0.347):
    either way, no model's accuracy is more than ~3x its chance level."""
    import itertools
    from collections import Counter

    people = [Identity(*v) for v in itertools.product(SKIN, FACE_SHAPES, HAIR, HAIR_STYLES, EYES, (False, True))]
    looks = [expected(p, Scene()) for p in people]
    out = {}
    for k in IDENTITY_ATTRIBUTES:
        counts = Counter(str(d[k]) for d in looks)
        out[k] = sum((c / len(looks)) ** 2 for c in counts.values())
    out["mean"] = float(np.mean([out[k] for k in IDENTITY_ATTRIBUTES]))
    return out


def world_identities(folder) -> List[Identity]:
    """The people of a world written by :func:`write_world` (its ``world.json``)."""
    photos = json.loads((Path(folder) / "world.json").read_text())["photos"]
    return list(dict.fromkeys(identity_from_dict(p["identity"]) for p in photos))


def identity_from_dict(d: dict) -> Identity:
    return Identity(**{f.name: d[f.name] for f in fields(Identity)})
