"""The mixed-attention kernel as a TensorRT Python plugin with an AOT implementation.

Why AOT: an engine built with ``@trtp.aot_impl`` carries the PTX and the launch
parameters in the plan, so it serialises and loads without Python (trtexec, the
C++ runtime, our torch-free runtime). The plugin is opt-in: TensorRT already
fuses attention with different query and key lengths, so the default export
stays plain ops (see benchmarks/results/ for what was measured).

Usage at engine-build time, with an ONNX holding the custom node written by
:mod:`infiniteid.kernels.onnx_op`::

    from infiniteid.kernels.trt_plugin import register_plugin
    register_plugin()          # before parser.parse(...)

Nothing here imports tensorrt at module import time; ``register_plugin`` does.
This file deliberately has no ``from __future__ import annotations``: TensorRT's
decorators read the real annotation objects.

Plugin contract (``infiniteid::MixedAttention``, version "1"): inputs ``q, k, v``
``(B, H, N, D)`` contiguous, one dtype (fp16, bf16 or fp32), batch ``[text; ID]``
(see :mod:`infiniteid.layout`), and ``delta`` ``(B/2, H, 2, D)`` float32; attributes
``adain: int`` (0/1) and ``scale: float``; output like ``q``. The head dim must be
static; the token count and batch may be dynamic. ``aot_impl`` checks the dtypes,
ranks and (static) batch first (:func:`check_plugin_inputs`) and raises on
anything else, so a wrong graph fails the build instead of running a kernel on
bytes of another type.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

from .plugin_ptx import SHARED_MEM_LIMIT, TILE_CANDIDATES, current_capability, pick_kernel  # noqa: F401

PLUGIN_NAMESPACE = "infiniteid"
PLUGIN_NAME = "MixedAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")

_REGISTERED: Dict[str, bool] = {}


def _trt_dtype_name(trt, dtype) -> str:
    """A TensorRT dtype as the names used here ("float16", ...); any other dtype by its own name."""
    names = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}
    return names.get(dtype, str(dtype).split(".")[-1].lower())


def check_plugin_inputs(dtypes: Sequence[str], ranks: Sequence[int], batch: Optional[int]) -> None:
    """Refuse inputs the kernel cannot take (``ValueError`` naming the problem), before compiling it.

    ``dtypes`` and ``ranks`` of (q, k, v, delta); ``batch`` is q's batch when it is
    static (None when dynamic: the profile's ranges come from the batch layout).
    The kernel reads q, k, v with one element type, delta as float32 ``(B/2, H, 2, D)``
    and pairs text row ``b`` with ID row ``b + B/2``.
    """
    names = ("q", "k", "v", "delta")
    q_dtype = dtypes[0]
    if q_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{PLUGIN_ID}: q is {q_dtype}; the kernel takes {', '.join(SUPPORTED_DTYPES)}")
    if dtypes[1] != q_dtype or dtypes[2] != q_dtype:
        raise ValueError(f"{PLUGIN_ID}: q, k and v must share one dtype, got {', '.join(dtypes[:3])}")
    if dtypes[3] != "float32":
        raise ValueError(f"{PLUGIN_ID}: delta must be float32, got {dtypes[3]}")
    for name, rank in zip(names, ranks):
        if rank != 4:
            raise ValueError(f"{PLUGIN_ID}: {name} must have rank 4, got rank {rank}")
    if batch is not None and batch % 2:
        raise ValueError(f"{PLUGIN_ID}: the batch must be even (text rows then ID rows), got {batch}")


def register_plugin() -> None:
    """Register ``infiniteid::MixedAttention`` (descriptor + AOT impl) with TensorRT.

    Idempotent. Must run before the ONNX parser sees the custom node, in the
    process that builds the engine; processes that only load the engine need
    nothing (AOT).
    """
    if _REGISTERED.get(PLUGIN_ID):
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def mixed_attention_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, delta: trtp.TensorDesc, adain: int, scale: float
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(PLUGIN_ID)
    def mixed_attention_aot(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        delta: trtp.TensorDesc,
        adain: int,
        scale: float,
        outputs: Tuple[trtp.TensorDesc],
        tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        dims = q.shape_expr
        batch = dims[0]
        static_batch = (not batch.is_fake) and batch.is_constant
        check_plugin_inputs(
            [_trt_dtype_name(trt, t.dtype) for t in (q, k, v, delta)],
            [int(t.ndim) for t in (q, k, v, delta)],
            int(batch.constant_value()) if static_batch else None,
        )
        head = dims[3]
        if head.is_fake or not head.is_constant:
            raise ValueError(f"{PLUGIN_ID}: the head dim must be static")
        tokens = dims[2]
        static_tokens = (not tokens.is_fake) and tokens.is_constant
        n_static = tokens.constant_value() if static_tokens else 0
        kernel = pick_kernel(
            _trt_dtype_name(trt, q.dtype), int(head.constant_value()), float(scale), bool(adain),
            even_tokens=False, capability=current_capability(),
        )
        if static_tokens and n_static % kernel.block_m == 0 and n_static % kernel.block_n == 0:
            # a static token count that fills whole tiles: recompile without tail masks
            kernel = pick_kernel(
                _trt_dtype_name(trt, q.dtype), int(head.constant_value()), float(scale), bool(adain),
                even_tokens=True, capability=current_capability(),
                candidates=[(kernel.block_m, kernel.block_n, kernel.num_warps, kernel.num_stages)],
            )
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(tokens, kernel.block_m)
        launch.grid_y = dims[1]
        launch.grid_z = dims[0]
        launch.block_x = kernel.block_threads
        launch.shared_mem = kernel.shared_mem
        # kernel params: q, k, v, delta, then these int32 scalars, then the output
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(tokens), trtp.SymInt32(dims[1]), trtp.SymInt32(dims[0] // 2)])
        return kernel.name, kernel.ptx, launch, extra

    _REGISTERED[PLUGIN_ID] = True


def build_engine(onnx_path: str, profiles: Dict[str, Tuple[tuple, tuple, tuple]], workspace_gib: int = 4) -> bytes:
    """Parse an ONNX with the plugin node and build a serialized engine (for tests and tools).

    ``profiles`` maps input names to (min, opt, max) shapes. Returns the plan bytes.
    The ONNX should not carry the node's function body (see
    :func:`infiniteid.kernels.onnx_op.strip_function_bodies`): some parser versions
    import a local function in preference to a plugin.
    """
    import tensorrt as trt

    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        raise RuntimeError("\n".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gib << 30)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the logger output)")
    return bytes(plan)
