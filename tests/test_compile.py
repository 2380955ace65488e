"""torch.compile on the reference: the U-Net with Infinite-ID's processors traces whole.

What must hold for a compiled U-Net to be worth having: no graph breaks from the
processors, the ``infinite_id`` keyword or the kernel dispatch (each break is a
return to Python per layer per step), and the same numbers as eager. Checked with
CFG on and off and two images (batches of 8 and 4 rows), for the torch reference
and for the Triton kernel as one custom operator (Triton's interpreter on a CPU).

Tracing with ``fullgraph=True`` (any break raises) and AOTAutograd (``backend="aot_eager"``, which runs the fake
implementations and functionalisation inductor also relies on) run in the default
suite; inductor's C++ code generation takes minutes per shape on two cores, so the
inductor comparison is marked ``heavy`` (measured here: relative L2 error 1.1e-6 at
both shapes, fp32).
"""
import pytest
import torch

from infiniteid.model.loading import tiny_components
from infiniteid.model.processors import KWARG, IDConditioning, MixedSelfAttnProcessor

CASES = [(8, "cfg on, 2 images"), (4, "cfg off, 2 images")]


@pytest.fixture(scope="module")
def unet():
    return tiny_components(0).unet


def inputs(rows: int):
    g = torch.Generator().manual_seed(rows)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cond = IDConditioning(id_embeds=r(rows // 2, 6, 64), id_scale=torch.linspace(0.5, 1.5, rows // 2))
    return r(rows, 4, 16, 16), torch.tensor(500), r(rows, 77, 64), r(rows, 32), r(rows, 6), cond


def step_fn(unet):
    def step(x, t, ehs, te, tid, cond):
        return unet(
            x, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": te, "time_ids": tid},
            cross_attention_kwargs={KWARG: cond},
        ).sample

    return step


def use_kernel(unet, backend: str) -> None:
    for p in unet.attn_processors.values():
        if isinstance(p, MixedSelfAttnProcessor):
            p.kernel_backend = backend


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_whole_and_equals_eager(unet, backend):
    """``fullgraph=True`` raises on any graph break; the recorded graphs show what stayed whole."""
    if backend == "triton":
        pytest.importorskip("triton")
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def recording(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    use_kernel(unet, backend)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(step_fn(unet), backend=recording, fullgraph=True)
        cases = CASES if backend == "torch" else CASES[:1]  # the interpreted kernel is slow: one shape
        for rows, what in cases:
            args = inputs(rows)
            with torch.no_grad():
                eager, got = step_fn(unet)(*args), compiled(*args)
            assert rel(got, eager) < 1e-5, what
            assert not torch.equal(eager[: rows // 2], eager[rows // 2:])  # the two streams really differ
    finally:
        use_kernel(unet, "auto")
    assert len(graphs) == len(cases)  # one graph per batch shape, no breaks
    ops = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    kernels = sum("mixed_attention_triton" in o for o in ops)
    attn1 = sum(isinstance(p, MixedSelfAttnProcessor) for p in unet.attn_processors.values())
    assert kernels == (attn1 if backend == "triton" else 0) and attn1 == 8  # the kernel: one node per attn1


@pytest.mark.heavy
def test_inductor_equals_eager(unet):
    torch._dynamo.reset()
    compiled = torch.compile(step_fn(unet), fullgraph=True)
    for rows, what in CASES:
        args = inputs(rows)
        with torch.no_grad():
            assert rel(compiled(*args), step_fn(unet)(*args)) < 1e-5, what


def test_pipeline_compile_flag_generates_the_same_image():
    """``InfiniteIDPipeline(..., compile=...)``: the whole generation on the compiled U-Net."""
    from infiniteid.model.pipeline import FaceInput, InfiniteIDPipeline
    import numpy as np

    rng = np.random.default_rng(0)
    emb = rng.standard_normal(512).astype(np.float32)
    face = FaceInput(embedding=emb / np.linalg.norm(emb), crop=rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
    kw = dict(steps=2, height=64, width=64, seed=3, progress=False)
    eager = InfiniteIDPipeline(tiny_components(0))("a photo of a person", face, **kw).arrays[0]
    torch._dynamo.reset()
    pipe = InfiniteIDPipeline(tiny_components(0), compile={"backend": "aot_eager", "fullgraph": True})
    got = pipe("a photo of a person", face, **kw).arrays[0]
    assert np.abs(got.astype(int) - eager.astype(int)).max() <= 1


def test_gpu_e2e_benchmark_runs_tiny_on_the_cpu(tmp_path):
    """benchmarks/gpu_e2e.py --tiny: every stage of both models, with and without CFG.

    Eager SDPA only: compiling once per case costs minutes here and Triton's
    interpreter takes seconds per U-Net step; the compiled U-Net and the kernel under
    compile are what the tests above check."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_e2e
    finally:
        sys.path.pop(0)
    rc = gpu_e2e.main([
        "--tiny", "--modes", "eager", "--attention", "sdpa", "--batches", "1", "--steps", "2",
        "--repeats", "1", "--e2e-repeats", "1", "--warmup", "0", "--out", str(tmp_path / "e2e"),
    ])
    result = json.loads((tmp_path / "e2e.json").read_text())
    assert rc == 0, [r.get("error") for r in result["rows"]]
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["sdxl/eager/sdpa/b1/2st", "sdxl/eager/sdpa/b1/4st/nocfg",
                      "infiniteid/eager/sdpa/b1/2st", "infiniteid/eager/sdpa/b1/4st/nocfg"]
    for r in result["rows"]:
        assert r["unet_step_ms"] > 0 and r["e2e_ms"] > 0 and r["unet_step_floor_ratio"] > 0
        assert ("id_encoder_ms" in r) == r["label"].startswith("infiniteid")
    flops = result["floors"]["flops"]
    # two streams: the Infinite-ID U-Net step does more than twice plain SDXL's work (mixed attention's longer keys)
    assert flops["infiniteid/1/True/unet_step"] > 2 * flops["sdxl/1/True/unet_step"]
    assert "| infiniteid/eager/sdpa/b1/4st/nocfg |" in (tmp_path / "e2e.md").read_text()
