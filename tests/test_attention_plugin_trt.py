"""The TensorRT side of the mixed-attention plugin.

What runs here (no GPU, no TensorRT): every ``tensorrt`` / ``tensorrt.plugin`` name
the plugin code uses exists in the signature dumps of the real bindings (10.16 and
11.4), and the kernel compiles ahead of time to PTX with exactly the parameter list
TensorRT passes. What needs TensorRT and a GPU (building and running an engine) is
marked ``tensorrt`` and skipped elsewhere.
"""
from __future__ import annotations

import ast
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from infiniteid.kernels import plugin_ptx, trt_plugin
from infiniteid.kernels.plugin_ptx import PLUGIN_PARAMS, entry_params, strip_hidden_params

API = Path(__file__).parent / "data" / "tensorrt-api"
VERSIONS = ["10.16.1.11", "11.4.0.106"]


def dump_names(path: Path) -> dict:
    """{class or enum or module-level name: set of member names} from a signature dump."""
    names: dict = {"": set()}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line.startswith(" "):
            kind, _, rest = line.partition(" ")
            name = re.split(r"[:\s(]", rest, maxsplit=1)[0]
            names[""].add(name)
            current = names.setdefault(name, set())
            if kind == "ENUM":
                current.update(m.split("=")[0].strip() for m in rest.partition(":")[2].split(","))
        else:
            parts = line.split()
            member = parts[2] if parts[1][:-1].isdigit() else parts[1]  # "METH 1. name(" overloads
            current.add(re.split(r"[(\s]", member)[0])
    return names


def attribute_chains(source: str, root: str) -> set:
    """Every ``root.a`` / ``root.a.b`` chain in ``source``."""
    chains = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            parts = []
            cur = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == root:
                chains.add(".".join(reversed(parts)))
    return chains


@pytest.mark.parametrize("version", VERSIONS)
def test_plugin_module_uses_only_real_tensorrt_plugin_names(version):
    api = dump_names(API / f"trtp-{version}.txt")
    source = Path(trt_plugin.__file__).read_text()
    used = attribute_chains(source, "trtp")
    assert {"register", "aot_impl", "TensorDesc", "KernelLaunchParams", "SymInt32"} <= {c.split(".")[0] for c in used}
    for chain in used:
        top, _, member = chain.partition(".")
        assert top in api[""], f"tensorrt.plugin.{top} not in {version}"
        if member:
            assert member in api[top], f"tensorrt.plugin.{chain} not in {version}"
    # members used on objects TensorRT hands to the aot_impl
    for cls, members in {
        "TensorDesc": ["shape_expr", "dtype", "like", "ndim"],
        "ShapeExpr": ["is_fake", "is_constant", "constant_value"],
        "KernelLaunchParams": ["grid_x", "grid_y", "grid_z", "block_x", "shared_mem"],
        "SymIntExprs": ["from_tuple"],
    }.items():
        for m in members:
            assert m in api[cls], f"tensorrt.plugin.{cls}.{m} not in {version}"
            assert re.search(rf"\.{m}\b", source), f"{cls}.{m} listed here but not used"


@pytest.mark.parametrize("version", VERSIONS)
def test_engine_builder_uses_only_real_tensorrt_names(version):
    api = dump_names(API / f"trt-{version}.txt")
    used = attribute_chains(Path(trt_plugin.__file__).read_text(), "trt")
    for chain in used:
        parts = chain.split(".")
        assert parts[0] in api[""], f"tensorrt.{parts[0]} not in {version}"
        if len(parts) > 1:
            assert parts[1] in api[parts[0]], f"tensorrt.{chain} not in {version}"
    for cls, members in {
        "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"],
        "OnnxParser": ["parse_from_file", "num_errors", "get_error"],
        "IBuilderConfig": ["set_memory_pool_limit", "add_optimization_profile"],
        "IOptimizationProfile": ["set_shape"],
    }.items():
        for m in members:
            assert m in api[cls], f"tensorrt.{cls}.{m} not in {version}"


FAKE_PTX = """
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.u64 %rd1, [k_param_0];
\tld.param.u32 %r1, [k_param_1];
\t%s
}
"""


def test_strip_hidden_params():
    ptx = FAKE_PTX.replace("%s", "ret;")
    stripped = strip_hidden_params(ptx, "k", 2)
    assert entry_params(stripped, "k") == [
        ".param .u64 .ptr .global .align 1 k_param_0",
        ".param .u32 k_param_1",
    ]
    assert strip_hidden_params(ptx, "k", 4) == ptx
    used = FAKE_PTX.replace("%s", "ld.param.u64 %rd2, [k_param_3];")
    with pytest.raises(ValueError, match="hidden parameter 3 of k is used"):
        strip_hidden_params(used, "k", 2)
    with pytest.raises(ValueError, match="no .entry nope"):
        strip_hidden_params(ptx, "nope", 2)


def compile_in_subprocess(*args: str) -> dict:
    """Compile through ``python -m infiniteid.kernels.plugin_ptx`` with the interpreter off
    (interpreted kernels have no PTX; conftest.py turns the interpreter on without CUDA).

    ``-X importtime`` lists every module the process imports: an engine-build box
    must be able to compile the plugin without torch.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-W", "ignore", "-X", "importtime", "-m", "infiniteid.kernels.plugin_ptx",
         "--capability", "9.0", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "triton" in imported and "infiniteid.kernels.triton_device" in imported
    assert "torch" not in imported, "compiling the plugin kernel imported torch"
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_plugin_ptx(info: dict) -> None:
    params = info["params"]
    assert len(params) == len(PLUGIN_PARAMS) == 8
    kinds = [p.split()[1] for p in params]
    # q, k, v, delta pointers; n_ctx, n_heads, pairs int32; the output pointer
    assert kinds == [".u64"] * 4 + [".u32"] * 3 + [".u64"]
    assert info["shared_mem"] <= trt_plugin.SHARED_MEM_LIMIT
    assert info["target"].startswith("sm_90")
    assert info["name"] == "mixed_attn_plugin_kernel"
    assert info["ptx_version"] == "8.0"  # pinned: CUDA 12.0 drivers load it (Triton's own default is 9.x)


def cuda12_ptxas() -> str:
    """The CUDA 12 ``ptxas`` Triton ships (for targets below sm_90), or skip."""
    from triton import knobs

    tool = knobs.nvidia.ptxas
    if tool is None or not str(tool.version).startswith("12."):
        pytest.skip(f"triton's bundled ptxas is not a CUDA 12 one ({tool and tool.version})")
    return tool.path


def test_plugin_kernel_compiles_to_ptx_with_tensorrt_parameter_order(tmp_path):
    pytest.importorskip("triton")
    ptx = tmp_path / "plugin.ptx"
    info = compile_in_subprocess("--dtype", "float16", "--head-dim", "64", "--ptx", str(ptx))
    check_plugin_ptx(info)
    assert plugin_ptx.ptx_isa_version(ptx.read_text()) == "8.0"
    # what a CUDA 12 toolchain (and so a CUDA 12 driver's JIT) does with it: it assembles
    res = subprocess.run([cuda12_ptxas(), f"--gpu-name={info['target']}", str(ptx), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k.cubin").stat().st_size > 1000
    # and what it does with Triton's default stamp (9.x): refuses, which is why the version is pinned
    unpinned = tmp_path / "unpinned.ptx"
    unpinned.write_text(re.sub(r"^\.version 8\.0", ".version 9.4", ptx.read_text(), flags=re.M))
    res = subprocess.run([cuda12_ptxas(), f"--gpu-name={info['target']}", str(unpinned), "-o", str(tmp_path / "u.cubin")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Unsupported .version 9.4" in res.stderr
    assert info["wgmma"]  # Hopper tensor-core instructions
    assert info["tile"] == list(trt_plugin.TILE_CANDIDATES[0][:2]) + [trt_plugin.TILE_CANDIDATES[0][3]]


@pytest.mark.parametrize("dtype,head_dim", [("bfloat16", 64), ("float16", 128), ("float32", 64)])
def test_plugin_kernel_fits_the_shared_memory_limit_for_every_dtype(dtype, head_dim):
    pytest.importorskip("triton")
    check_plugin_ptx(compile_in_subprocess("--dtype", dtype, "--head-dim", str(head_dim), "--no-adain", "--even-tokens"))


def test_compiling_under_the_interpreter_is_refused():
    pytest.importorskip("triton")
    from infiniteid.kernels.triton_mixed import interpreting

    if not interpreting():
        pytest.skip("only meaningful with TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET unset"):
        plugin_ptx.compile_plugin_kernel(plugin_ptx.PluginKernelSpec(dtype="float16", head_dim=64, scale=0.125))


def test_aot_impl_input_checks():
    """What aot_impl refuses before compiling: mixed q/k/v dtypes, a non-float32 delta, wrong ranks, an odd batch."""
    ok = ["float16"] * 3 + ["float32"]
    trt_plugin.check_plugin_inputs(ok, [4, 4, 4, 4], 4)
    trt_plugin.check_plugin_inputs(ok, [4, 4, 4, 4], None)  # a dynamic batch is the profile's business
    trt_plugin.check_plugin_inputs(["bfloat16"] * 3 + ["float32"], [4] * 4, 2)
    cases = [
        (["float16", "float32", "float16", "float32"], [4] * 4, 2, "q, k and v must share one dtype, got float16, float32, float16"),
        (["float16"] * 4, [4] * 4, 2, "delta must be float32, got float16"),
        (["int8"] * 3 + ["float32"], [4] * 4, 2, "q is int8; the kernel takes float16, bfloat16, float32"),
        (ok, [4, 4, 4, 5], 2, "delta must have rank 4, got rank 5"),
        (ok, [3, 4, 4, 4], 2, "q must have rank 4, got rank 3"),
        (ok, [4] * 4, 3, "the batch must be even .*got 3"),
    ]
    for dtypes, ranks, batch, message in cases:
        with pytest.raises(ValueError, match=r"infiniteid::MixedAttention: " + message):
            trt_plugin.check_plugin_inputs(dtypes, ranks, batch)


def test_ptx_version_follows_the_target():
    assert plugin_ptx.plugin_ptx_version((8, 0)) == 80
    assert plugin_ptx.plugin_ptx_version((8, 9)) == 80
    assert plugin_ptx.plugin_ptx_version((9, 0)) == 80
    assert plugin_ptx.plugin_ptx_version((10, 0)) == 86
    assert plugin_ptx.plugin_ptx_version((10, 3)) == 88
    assert plugin_ptx.plugin_ptx_version((12, 0)) == 87
    assert plugin_ptx.ptx_isa_version("//\n.version 8.5\n.target sm_90a\n") == "8.5"
    with pytest.raises(ValueError, match="declares no .version"):
        plugin_ptx.ptx_isa_version(".target sm_90a\n")


def test_capability_without_a_gpu_needs_a_default_and_not_torch():
    import subprocess

    code = (
        "import sys\n"
        "from infiniteid.kernels.plugin_ptx import current_capability\n"
        "print(current_capability(default=(8, 6)), 'torch' in sys.modules)\n"
        "try:\n"
        "    current_capability()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    if lines[0] != "(8, 6) False":
        pytest.skip(f"a GPU answered: {lines[0]}")
    assert lines[1] == "no CUDA device to compile the plugin kernel for; pass a capability"


def test_plugin_spec_validation():
    with pytest.raises(ValueError, match="head_dim"):
        plugin_ptx.PluginKernelSpec(dtype="float16", head_dim=48, scale=0.1).validate()
    with pytest.raises(ValueError, match="dtype"):
        plugin_ptx.PluginKernelSpec(dtype="int8", head_dim=64, scale=0.1).validate()
    with pytest.raises(ValueError, match="scale"):
        plugin_ptx.PluginKernelSpec(dtype="float16", head_dim=64, scale=float("nan")).validate()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_engine_with_plugin_matches_reference(tmp_path):
    """Build an engine from the plugin-node ONNX, run it, compare with the torch reference."""
    import onnx
    import tensorrt as trt
    import torch

    from infiniteid.kernels import mixed_attention
    from infiniteid.kernels.onnx_op import CUSTOM_OPSETS, attention_plugin, strip_function_bodies
    from infiniteid.kernels.reference import mixed_attention_math

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return mixed_attention(q, k, v, adain=True, backend="torch")

    shape = (4, 2, 300, 64)
    q, k, v = (torch.randn(*shape) + torch.randn(shape[0], 1, 1, 64) for _ in range(3))
    buf = io.BytesIO()
    with attention_plugin(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Attn(), (q.half(), k.half(), v.half()), buf, dynamo=False, opset_version=17,
                          custom_opsets=CUSTOM_OPSETS, input_names=["q", "k", "v"], output_names=["out"],
                          dynamic_axes={n: {0: "b", 2: "n"} for n in ("q", "k", "v")})
    path = tmp_path / "attn.onnx"
    onnx.save(strip_function_bodies(onnx.load_from_string(buf.getvalue())), path)
    plan = trt_plugin.build_engine(str(path), {n: ((2, 2, 64, 64), shape, (8, 2, 1024, 64)) for n in ("q", "k", "v")})

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    assert engine is not None
    ctx = engine.create_execution_context()
    dev = {n: t.half().cuda().contiguous() for n, t in (("q", q), ("k", k), ("v", v))}
    for name, t in dev.items():
        assert ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    out = torch.empty(shape, dtype=torch.float16, device="cuda")
    ctx.set_tensor_address("out", out.data_ptr())
    stream = torch.cuda.current_stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    truth = mixed_attention_math(q.double(), k.double(), v.double(), adain=True)
    err = ((out.double().cpu() - truth).norm() / truth.norm()).item()
    assert err < 3e-3
