"""Images and conventions a new user meets: 16-bit faces, over-long prompts, ``--version``,
``check``'s exit statuses, the reference pipeline's defaults, the benchmark's ``--help``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infiniteid.face.images import load_image

PHOTO = Path(__file__).parent / "data" / "faces" / "Tom_Hanks_54745.png"
REPO = Path(__file__).resolve().parents[1]


# -- 16-bit images ----------------------------------------------------------------------
def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey8 = np.asarray(Image.open(PHOTO).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # 0..255 -> 0..65535
    with Image.open(path) as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(load_image(path), np.repeat(grey8[:, :, None], 3, axis=2))


def test_sixteen_bit_face_is_found(tmp_path):
    pytest.importorskip("insightface", reason="the face front end needs insightface")
    from infiniteid.face import FaceEmbedder, write_synthetic_face_models

    grey8 = np.asarray(Image.open(PHOTO).convert("L"))
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)
    face = FaceEmbedder.from_folder(write_synthetic_face_models(tmp_path / "models", seed=0),
                                    providers=["CPUExecutionProvider"])
    got = face.embed(path)  # was: an all-white image, "no face found"
    want = face.embed(np.repeat(grey8[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(got.embedding, want.embedding)
