"""A batch may hold requests with different numbers of mixed faces: it runs as one sub-batch
per identity-token count and returns results in request order, each identical to a batch of
its group alone (runtime and reference alike)."""
from __future__ import annotations


import numpy as np
import pytest

from infiniteid import generation as gen
from infiniteid.commands.demo import tiny_bundle
from infiniteid.runtime import FaceInput, Runtime

SETTINGS = dict(height=64, width=64, steps=2)


def face(seed: int) -> FaceInput:
    rng = np.random.default_rng(seed)
    e = rng.standard_normal(512).astype(np.float32)
    return FaceInput(embedding=e / np.linalg.norm(e), crop=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))


def requests():
    return [gen.GenerationRequest("a photo of a person", faces=[face(1)], seed=1),
            gen.GenerationRequest("an oil painting", faces=[face(2), face(3)], seed=2, guidance=4.0),
            gen.GenerationRequest("a portrait", faces=[face(2), face(3)], seed=4,
                                  identity=gen.IdentityMix("interpolate", 0.3)),
            gen.GenerationRequest("a person in the snow", faces=[face(4)], seed=3)]


def test_groups_by_identity_count_in_order_of_first_appearance():
    assert [gen.identity_count(r) for r in requests()] == [1, 2, 1, 1]
    groups = gen.identity_groups(requests())
    assert groups == [[0, 2, 3], [1]]
    assert gen.in_request_order(groups, [["a", "c", "d"], ["b"]]) == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return Runtime(tiny_bundle(tmp_path_factory.getbasetemp() / "iid-cache", progress=False), intra_op_threads=1)


def check_merged(whole, groups_alone, n):
    (a, b) = groups_alone  # results of [0, 2, 3] and of [1]
    want = [a.arrays[0], b.arrays[0], a.arrays[1], a.arrays[2]]
    for got, w in zip(whole.arrays, want):
        np.testing.assert_array_equal(got, w)
    for got, w in zip(whole.text_arrays, [a.text_arrays[0], b.text_arrays[0], a.text_arrays[1], a.text_arrays[2]]):
        np.testing.assert_array_equal(got, w)
    lat = np.asarray(whole.latents)
    la, lb = np.asarray(a.latents), np.asarray(b.latents)
    np.testing.assert_array_equal(lat[:n], np.stack([la[0], lb[0], la[1], la[2]]))  # text stream rows
    np.testing.assert_array_equal(lat[n:], np.stack([la[3], lb[1], la[4], la[5]]))  # ID stream rows
    assert len(whole.images) == n and [im.size for im in whole.images] == [(64, 64)] * n


def test_runtime_batch_with_one_and_two_face_requests(rt):
    reqs = requests()
    s = gen.BatchSettings(return_text_stream=True, **SETTINGS)
    whole = rt.generate(reqs, s, progress=False)  # was: "requests in one batch must have the same number of identity tokens"
    alone = (rt.generate([reqs[0], reqs[2], reqs[3]], s, progress=False), rt.generate([reqs[1]], s, progress=False))
    check_merged(whole, alone, 4)
    assert set(whole.timings) == {"encode", "denoise", "decode"}
    assert not np.array_equal(whole.arrays[0], whole.arrays[3])  # different requests, different images


def test_reference_batch_with_one_and_two_face_requests():
    from infiniteid.model.pipeline import FaceInput as RefFace, InfiniteIDPipeline

    pipe = InfiniteIDPipeline.tiny(0)
    reqs = requests()
    for r in reqs:
        r.faces = [RefFace(f.embedding, f.crop) for f in r.faces]
    s = gen.BatchSettings(return_text_stream=True, **SETTINGS)
    whole = pipe.generate(reqs, s, progress=False)
    alone = (pipe.generate([reqs[0], reqs[2], reqs[3]], s, progress=False), pipe.generate([reqs[1]], s, progress=False))
    check_merged(whole, alone, 4)
