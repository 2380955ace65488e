"""Synthetic stand-ins for an insightface model folder (tests and the demo).

No face model weights may be downloaded, so tests and the tiny CPU demo need a
model folder that insightface's ``FaceAnalysis`` accepts and routes exactly as
it routes a real ``antelopev2`` / ``buffalo_l`` folder. This module writes two
ONNX files with ``onnx.helper`` and numpy only (no torch: the torch-free demo
builds them too):

``synthetic_arcface.onnx``
    ArcFace-shaped recogniser: input ``input.1`` (N, 3, 112, 112) float,
    one output ``embedding`` (N, 512). A real (small) conv net -- four
    stride-2 convolutions with PReLU, then a fully connected layer -- with
    seeded random weights. Its embedding is a deterministic function of the
    aligned pixels, but it is **not** a face recogniser: similar pixels give
    similar vectors, identities mean nothing to it.

``synthetic_scrfd.onnx``
    SCRFD-shaped detector: input ``input.1`` (1, 3, 640, 640) float, nine
    outputs (scores, box distances and 5-point keypoint offsets for strides
    8, 16 and 32, two anchors per cell), the layout insightface's SCRFD
    decoder expects. It is **not** a face detector. It reports the faces it
    was *scripted* with (``faces``: boxes given as fractions of its 640x640
    input frame, keypoints at the ArcFace template positions inside each
    box), and it reports a scripted face only where the input has contrast
    inside that box (pixel standard deviation above a few grey levels). So a
    blank image, or a box that falls on the letterbox padding, gives "no
    face" -- the one input-dependent decision it makes, computed in the graph.

insightface letterboxes the image into the top-left of the 640x640 frame
(aspect kept), so for a square image the frame is the image. Because each
scripted box carries the template keypoints, aligning a synthetic detection
is exactly "crop this box and resize it to 112x112"; with the full-frame box
``(0.5, 0.5, 1.0)`` on an already aligned crop, alignment is the identity.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence, Tuple

import numpy as np

from .align import ARCFACE_TEMPLATE_112

#: File names written by :func:`write_synthetic_face_models`.
SYNTHETIC_DETECTOR = "synthetic_scrfd.onnx"
SYNTHETIC_RECOGNIZER = "synthetic_arcface.onnx"

#: (cx, cy, size): a square face box as fractions of the detector frame.
FaceBox = Tuple[float, float, float]

#: The default script: one face, the middle half of the frame (portrait framing).
DEFAULT_FACES: Tuple[FaceBox, ...] = ((0.5, 0.5, 0.5),)

DET_SIZE = 640
EMBED_DIM = 512
_STRIDES = (8, 16, 32)
_ANCHORS = 2  # per cell, as in insightface's 9-output SCRFD models
_FACE_STRIDE = 32  # scripted faces sit on the coarsest level
_OPSET = 17
_IR_VERSION = 8  # readable by every onnxruntime >= 1.10

# The ArcFace 112x112 five-point template (align.py imports only numpy, so
# this module needs neither insightface nor OpenCV).
_ARCFACE_TEMPLATE = ARCFACE_TEMPLATE_112.astype(np.float32)

# A scripted face needs a pixel standard deviation above ~2.5 grey levels
# inside its box (SCRFD's input blob is (pixel - 127.5) / 128).
_CONTRAST_THRESHOLD = 2.5 / 128.0
_CONTRAST_GAIN = 400.0


def write_synthetic_face_models(folder: str | os.PathLike, seed: int = 0,
                                faces: Iterable[FaceBox] = DEFAULT_FACES) -> Path:
    """Write a synthetic insightface model folder and return its path.

    ``folder`` is created if needed. ``seed`` fixes the recogniser weights.
    ``faces`` scripts the detector (see the module docstring); an empty
    sequence gives a detector that never finds a face. The folder also gets a
    ``README.txt`` saying that these are synthetic models.
    """
    import onnx  # local: importing this module stays cheap

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    faces = tuple(_check_face(f) for f in faces)
    onnx.save(build_synthetic_recognizer(seed), str(folder / SYNTHETIC_RECOGNIZER))
    onnx.save(build_synthetic_detector(faces), str(folder / SYNTHETIC_DETECTOR))
    (folder / "README.txt").write_text(
        "Synthetic insightface-shaped models written by "
        "infiniteid.face.synthetic (seed=%d).\n"
        "They are NOT face models: the recogniser has random weights and the "
        "detector reports scripted boxes %r (fractions of its 640x640 frame).\n"
        % (seed, faces))
    return folder


def _check_face(face: Sequence[float]) -> FaceBox:
    cx, cy, size = (float(v) for v in face)
    if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0 and 0.0 < size <= 2.0):
        raise ValueError(f"face (cx, cy, size) must be fractions of the frame, got {face!r}")
    return cx, cy, size


def scripted_boxes(faces: Iterable[FaceBox] = DEFAULT_FACES, det_size: int = DET_SIZE):
    """Boxes and keypoints, in detector-frame pixels, that the detector reports.

    Returns ``[(box (4,), kps (5, 2)), ...]``; tests use it to know where the
    scripted faces land (divide by insightface's letterbox scale to get image
    pixels).
    """
    out = []
    for cx, cy, size in (_check_face(f) for f in faces):
        cx, cy, side = cx * det_size, cy * det_size, size * det_size
        x0, y0 = cx - side / 2, cy - side / 2
        box = np.array([x0, y0, x0 + side, y0 + side], dtype=np.float32)
        kps = (np.array([x0, y0], dtype=np.float32)
               + _ARCFACE_TEMPLATE / 112.0 * np.float32(side))
        out.append((box, kps.astype(np.float32)))
    return out


# --------------------------------------------------------------------------
# recogniser


def build_synthetic_recognizer(seed: int = 0):
    """The ArcFace-shaped ONNX model (an ``onnx.ModelProto``), seeded."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    channels = [3, 16, 32, 32, 32]  # 112 -> 56 -> 28 -> 14 -> 7
    x = "input.1"
    for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        slope = np.full((cout, 1, 1), 0.25, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"),
                  numpy_helper.from_array(b, f"conv{i}.bias"),
                  numpy_helper.from_array(slope, f"prelu{i}.slope")]
        # Node names must not start with "Sub"/"Mul": insightface reads such
        # names as "normalisation inside the graph" (mxnet exports) and would
        # then skip its (x - 127.5) / 127.5 input scaling.
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"],
                                      name=f"conv{i}", kernel_shape=[3, 3], strides=[2, 2],
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("PRelu", [f"c{i}", f"prelu{i}.slope"], [f"a{i}"],
                                      name=f"prelu{i}"))
        x = f"a{i}"
    features = channels[-1] * 7 * 7
    fc_w = (rng.standard_normal((features, EMBED_DIM)) / np.sqrt(features)).astype(np.float32)
    fc_b = (rng.standard_normal(EMBED_DIM) * 0.01).astype(np.float32)
    inits += [numpy_helper.from_array(fc_w, "fc.weight"), numpy_helper.from_array(fc_b, "fc.bias")]
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["embedding"], name="fc"))
    graph = helper.make_graph(
        nodes, "synthetic_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBED_DIM])],
        inits)
    graph.doc_string = ("SYNTHETIC ArcFace-shaped model with random weights (seed=%d); "
                        "not a face recogniser." % seed)
    return _model(graph)


# --------------------------------------------------------------------------
# detector


def build_synthetic_detector(faces: Iterable[FaceBox] = DEFAULT_FACES):
    """The SCRFD-shaped ONNX model (an ``onnx.ModelProto``) for a face script.

    Output order is insightface's: scores for strides 8, 16, 32, then box
    distances for the same strides, then keypoint offsets; rows are
    ``(cell_y, cell_x, anchor)`` in C order, distances in stride units.
    """
    from onnx import TensorProto, helper, numpy_helper

    faces = tuple(_check_face(f) for f in faces)
    nodes, inits, outputs = [], [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def rows(stride):
        return (DET_SIZE // stride) ** 2 * _ANCHORS

    # Grey image, then per scripted face: contrast inside its box -> logit.
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["grey"], name="grey",
                                  axes=[1], keepdims=1))
    n32 = rows(_FACE_STRIDE)
    score_bias = np.full((n32, 1), -30.0, dtype=np.float32)
    dist32 = np.ones((n32, 4), dtype=np.float32)
    kps32 = np.zeros((n32, 10), dtype=np.float32)
    logits = []
    grid = DET_SIZE // _FACE_STRIDE
    for k, (box, kps) in enumerate(scripted_boxes(faces)):
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        gx = int(np.clip(round(cx / _FACE_STRIDE), 0, grid - 1))
        gy = int(np.clip(round(cy / _FACE_STRIDE), 0, grid - 1))
        row = (gy * grid + gx) * _ANCHORS  # anchor 0 of that cell
        if score_bias[row, 0] == 0.0:
            raise ValueError(f"two scripted faces share the anchor cell of face {k}: {faces}")
        anchor = np.array([gx, gy], dtype=np.float32) * _FACE_STRIDE
        score_bias[row, 0] = 0.0
        dist32[row] = np.array([anchor[0] - box[0], anchor[1] - box[1],
                                box[2] - anchor[0], box[3] - anchor[1]]) / _FACE_STRIDE
        kps32[row] = ((kps - anchor) / _FACE_STRIDE).reshape(-1)
        # Standard deviation of the grey image inside the box (clipped to the frame).
        lo = np.clip(np.floor(box[:2]), 0, DET_SIZE - 1).astype(np.int64)
        hi = np.clip(np.ceil(box[2:]), lo + 1, DET_SIZE).astype(np.int64)
        p = f"face{k}"
        nodes += [
            helper.make_node("Slice", ["grey", const(f"{p}.starts", lo[::-1].copy()),
                                       const(f"{p}.ends", hi[::-1].copy()),
                                       const(f"{p}.axes", np.array([2, 3], dtype=np.int64))],
                             [f"{p}.region"], name=f"{p}.region"),
            helper.make_node("ReduceMean", [f"{p}.region"], [f"{p}.mean"], name=f"{p}.mean",
                             keepdims=0),
            helper.make_node("Pow", [f"{p}.region", const(f"{p}.two", np.float32(2.0))],
                             [f"{p}.sq"], name=f"{p}.sq"),
            helper.make_node("ReduceMean", [f"{p}.sq"], [f"{p}.meansq"], name=f"{p}.meansq",
                             keepdims=0),
            helper.make_node("Pow", [f"{p}.mean", f"{p}.two"], [f"{p}.mean2"], name=f"{p}.mean2"),
            helper.make_node("Sub", [f"{p}.meansq", f"{p}.mean2"], [f"{p}.var"], name=f"{p}.var"),
            helper.make_node("Relu", [f"{p}.var"], [f"{p}.var+"], name=f"{p}.var+"),
            helper.make_node("Sqrt", [f"{p}.var+"], [f"{p}.std"], name=f"{p}.std"),
            helper.make_node("Sub", [f"{p}.std", const(f"{p}.thr", np.float32(_CONTRAST_THRESHOLD))],
                             [f"{p}.excess"], name=f"{p}.excess"),
            helper.make_node("Mul", [f"{p}.excess", const(f"{p}.gain", np.float32(_CONTRAST_GAIN))],
                             [f"{p}.logit"], name=f"{p}.logit"),
        ]
        onehot = np.zeros((n32, 1), dtype=np.float32)
        onehot[row, 0] = 1.0
        nodes.append(helper.make_node("Mul", [f"{p}.logit", const(f"{p}.onehot", onehot)],
                                      [f"{p}.placed"], name=f"{p}.placed"))
        logits.append(f"{p}.placed")
    nodes.append(helper.make_node("Sum", [const("score32.bias", score_bias)] + logits,
                                  ["score32.logit"], name="score32.logit"))

    # Outputs, in insightface's order: scores 8/16/32, boxes 8/16/32, kps 8/16/32.
    names = {}
    for s in _STRIDES:
        n = rows(s)
        names[("score", s)] = f"score_{s}"
        names[("bbox", s)] = f"bbox_{s}"
        names[("kps", s)] = f"kps_{s}"
        if s == _FACE_STRIDE:
            nodes.append(helper.make_node("Sigmoid", ["score32.logit"], [f"score_{s}"],
                                          name=f"score_{s}"))
            nodes.append(helper.make_node("Identity", [const("bbox32", dist32)], [f"bbox_{s}"],
                                          name=f"bbox_{s}"))
            nodes.append(helper.make_node("Identity", [const("kps32", kps32)], [f"kps_{s}"],
                                          name=f"kps_{s}"))
        else:  # no face on the finer levels: score 0, unit boxes
            for kind, width, value in (("score", 1, 0.0), ("bbox", 4, 1.0), ("kps", 10, 0.0)):
                nodes.append(helper.make_node(
                    "ConstantOfShape", [const(f"{kind}{s}.shape", np.array([n, width], np.int64))],
                    [f"{kind}_{s}"], name=f"{kind}_{s}",
                    value=numpy_helper.from_array(np.array([value], dtype=np.float32))))
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s in _STRIDES:
            outputs.append(helper.make_tensor_value_info(names[(kind, s)], TensorProto.FLOAT,
                                                         [rows(s), width]))
    graph = helper.make_graph(
        nodes, "synthetic_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, DET_SIZE, DET_SIZE])],
        outputs, inits)
    graph.doc_string = ("SYNTHETIC SCRFD-shaped detector; not a face detector. It reports "
                        "the scripted faces %r (fractions of its %dx%d frame) where the image "
                        "has contrast inside the box." % (faces, DET_SIZE, DET_SIZE))
    return _model(graph)


def _model(graph):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)],
                              producer_name="infiniteid.face.synthetic")
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model
