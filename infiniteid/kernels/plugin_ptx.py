"""Ahead-of-time compilation of the mixed-attention kernel to PTX for TensorRT.

Why a separate step: a TensorRT AOT plugin stores (kernel name, PTX, launch
parameters, int32 extra arguments) in the engine, so the plan loads and runs
without Python. TensorRT launches the kernel with exactly

    (input pointers..., int32 extra args..., output pointers...)

Newer Triton appends hidden parameters (``global_scratch``, ``profile_scratch``)
to every kernel. TensorRT does not pass them, so a kernel that declares them would
read argument slots that do not exist. We therefore require both scratch sizes to
be zero and delete the hidden parameters from the PTX ``.entry`` declaration after
checking that the body never loads them.

PTX version: without one, Triton stamps the PTX with the ISA version of the
``ptxas`` it bundles (Triton 3.9 on sm_90: ``.version 9.4``, the CUDA 13.4
level), which CUDA 12 drivers refuse to load, so the engine would fail on most
machines. :func:`plugin_ptx_version` pins the oldest ISA that has the target:
8.0 (CUDA 12.0, the oldest CUDA TensorRT 10 supports) up to Hopper, later for
the GPUs that came after (Blackwell sm_100 arrived with 8.6, sm_120 with 8.7).

This module needs triton (not tensorrt, not torch, not a GPU): the PTX can be
produced and checked on a CPU for a given target (e.g. sm_90).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

#: kernel parameters TensorRT passes: inputs q, k, v, delta; int32 n_ctx, n_heads, pairs; output
PLUGIN_PARAMS = ("Q", "K", "V", "Delta", "n_ctx", "n_heads", "pairs", "Out")
_POINTERS = (0, 1, 2, 3, 7)

TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


#: (oldest compute capability, PTX ISA version x10) from newest to oldest: the first
#: entry at or below the target gives the ISA the PTX is pinned to.
PTX_ISA_BY_CAPABILITY: Tuple[Tuple[Tuple[int, int], int], ...] = (
    ((12, 0), 87),  # sm_120 (CUDA 12.8)
    ((11, 0), 90),  # sm_110 (CUDA 13.0)
    ((10, 3), 88),  # sm_103 (CUDA 12.9)
    ((10, 0), 86),  # sm_100 (CUDA 12.8)
    ((0, 0), 80),  # up to sm_90a: CUDA 12.0, TensorRT 10's oldest CUDA
)


def plugin_ptx_version(capability: Tuple[int, int]) -> int:
    """The PTX ISA version (x10, Triton's ``ptx_version`` option) the plugin kernel is pinned to."""
    for floor, isa in PTX_ISA_BY_CAPABILITY:
        if tuple(capability) >= floor:
            return isa
    raise ValueError(f"no PTX version for compute capability {capability}")  # unreachable: (0, 0) is the floor


def ptx_isa_version(ptx: str) -> str:
    """The ``.version`` a PTX text declares, e.g. ``"8.0"``."""
    match = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.M)
    if not match:
        raise ValueError("the PTX declares no .version")
    return match.group(1)


@dataclass(frozen=True)
class PluginKernelSpec:
    """What one compiled plugin kernel is specialised for."""

    dtype: str  # "float16" | "bfloat16" | "float32"
    head_dim: int
    scale: float
    adain: bool = True
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    #: when the token count is static and a multiple of both blocks, masks are compiled out
    even_tokens: bool = False
    #: (major, minor) compute capability to compile for, e.g. (9, 0)
    capability: Tuple[int, int] = (9, 0)

    def validate(self) -> "PluginKernelSpec":
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TRITON_DTYPES)}, got {self.dtype!r}")
        if self.head_dim not in (16, 32, 64, 128):
            raise ValueError(f"head_dim must be 16, 32, 64 or 128, got {self.head_dim}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive finite number, got {self.scale}")
        return self


@dataclass(frozen=True)
class PluginKernel:
    """A compiled kernel ready to hand to TensorRT."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int
    block_m: int
    block_n: int
    num_stages: int

    @property
    def block_threads(self) -> int:
        return self.num_warps * 32


def strip_hidden_params(ptx: str, name: str, n_params: int) -> str:
    """Remove parameters past ``n_params`` from the ``.entry name(...)`` declaration.

    Raises if one of them is referenced in the body (then the kernel really needs
    it and TensorRT cannot run it).
    """
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if not match:
        raise ValueError(f"no .entry {name} in PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < n_params:
        raise ValueError(f"kernel {name} declares {len(params)} params, expected at least {n_params}")
    if len(params) == n_params:
        return ptx
    body = ptx[match.end():]
    for index in range(n_params, len(params)):
        if re.search(re.escape(f"{name}_param_{index}") + r"\b", body):
            raise ValueError(f"hidden parameter {index} of {name} is used by the kernel; TensorRT cannot pass it")
    decl = "(\n\t" + ",\n\t".join(params[:n_params]) + "\n)"
    return ptx[: match.start(1) - 1] + decl + ptx[match.end():]


def entry_params(ptx: str, name: str) -> list:
    """The parameter declarations of ``.entry name`` (for tests and checks)."""
    match = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.S)
    if not match:
        raise ValueError(f"no .entry {name} in PTX")
    return [p.strip() for p in match.group(1).split(",") if p.strip()]


def compile_plugin_kernel(spec: PluginKernelSpec) -> PluginKernel:
    """Compile :func:`~infiniteid.kernels.triton_device.mixed_attn_plugin_kernel` to PTX (pinned ISA version)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .triton_device import LOG2E, interpreting, mixed_attn_plugin_kernel

    spec.validate()
    if interpreting():
        raise RuntimeError("compiling the plugin kernel needs TRITON_INTERPRET unset (interpreted kernels have no PTX)")
    ty = TRITON_DTYPES[spec.dtype]
    signature = {
        "Q": f"*{ty}", "K": f"*{ty}", "V": f"*{ty}", "Delta": "*fp32",
        "n_ctx": "i32", "n_heads": "i32", "pairs": "i32",
        "Out": f"*{ty}",
    }
    constexprs = {
        "QK_SCALE": spec.scale * LOG2E,
        "HEAD_DIM": spec.head_dim,
        "BLOCK_M": spec.block_m,
        "BLOCK_N": spec.block_n,
        "ADAIN": bool(spec.adain),
        "EVEN_M": spec.even_tokens,
        "EVEN_N": spec.even_tokens,
        "PREC": "ieee" if spec.dtype == "float32" else "tf32",
        "DOT_F32": False,
    }
    for key in constexprs:
        signature[key] = "constexpr"
    # TensorRT allocations are at least 256-byte aligned: let Triton vectorise.
    attrs = {(i,): [["tt.divisibility", 16]] for i in _POINTERS}
    src = triton.compiler.ASTSource(fn=mixed_attn_plugin_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    major, minor = spec.capability
    target = GPUTarget("cuda", major * 10 + minor, 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages,
               "ptx_version": plugin_ptx_version(spec.capability)}
    compiled = triton.compile(src, target=target, options=options)
    md = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        size = getattr(md, scratch, 0) or 0
        if size:
            raise RuntimeError(f"kernel needs {scratch}={size}; TensorRT AOT plugins cannot provide scratch memory")
    ptx = strip_hidden_params(compiled.asm["ptx"], md.name, len(PLUGIN_PARAMS))
    want = options["ptx_version"]
    if ptx_isa_version(ptx) != f"{want // 10}.{want % 10}":
        raise RuntimeError(f"triton stamped the PTX .version {ptx_isa_version(ptx)}, not the pinned {want / 10:.1f}")
    return PluginKernel(
        name=md.name, ptx=ptx, num_warps=md.num_warps, shared_mem=md.shared,
        block_m=spec.block_m, block_n=spec.block_n, num_stages=spec.num_stages,
    )


#: Largest dynamic shared memory a plugin kernel may ask for. Whether TensorRT
#: raises a kernel's dynamic shared-memory limit past the CUDA default (48 KiB)
#: for AOT plugins is not documented, so the plugin stays within it.
SHARED_MEM_LIMIT = 48 * 1024

#: (block_m, block_n, num_warps, num_stages), tried in order; the first whose
#: shared memory fits :data:`SHARED_MEM_LIMIT` is used.
TILE_CANDIDATES: Tuple[Tuple[int, int, int, int], ...] = (
    (128, 64, 4, 2),
    (128, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 32, 4, 2),
    (64, 32, 4, 1),
    (32, 32, 4, 1),
)


def estimate_shared(elem: int, head_dim: int, block_m: int, block_n: int, warps: int, stages: int) -> int:
    """Rough shared memory of a tile config: ``stages`` K and V tiles plus the Q tile."""
    return elem * head_dim * (2 * stages * block_n + block_m)


def pick_kernel(
    dtype: str,
    head_dim: int,
    scale: float,
    adain: bool,
    even_tokens: bool,
    capability: Tuple[int, int],
    candidates: Sequence[Tuple[int, int, int, int]] = TILE_CANDIDATES,
    shared_limit: int = SHARED_MEM_LIMIT,
) -> PluginKernel:
    """Compile the first tile candidate whose shared memory fits ``shared_limit``.

    Candidates whose estimated shared memory is far over the limit are skipped
    without compiling. Runs on any machine with triton (no GPU, no TensorRT): the
    PTX is for ``capability``.
    """
    elem = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    likely = [c for c in candidates if estimate_shared(elem, head_dim, *c) <= 1.25 * shared_limit]
    tried = []
    for block_m, block_n, warps, stages in likely or list(candidates):
        kernel = compile_plugin_kernel(
            PluginKernelSpec(
                dtype=dtype, head_dim=head_dim, scale=scale, adain=adain,
                block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages,
                even_tokens=even_tokens, capability=capability,
            )
        )
        if kernel.shared_mem <= shared_limit:
            return kernel
        tried.append(f"{block_m}x{block_n}/s{stages}: {kernel.shared_mem} B")
    raise RuntimeError(f"no tile config fits {shared_limit} B of shared memory ({'; '.join(tried)})")


def current_capability(default: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Compute capability of the current CUDA device (engine builds run on the target GPU).

    Asked of Triton's own CUDA driver class (its CUDA-driver path: no torch is
    imported, none is needed; ``triton.runtime.driver.active`` would probe every
    backend and import torch where it is installed); ``default`` where there is
    no GPU, else a clear error.
    """
    try:
        from triton.backends import backends

        nvidia = backends.get("nvidia")
        if nvidia is not None and nvidia.driver.is_active():
            arch = int(nvidia.driver().get_current_target().arch)
            return (arch // 10, arch % 10)
    except Exception:  # no GPU, no driver, or no triton: fall through
        pass
    if default is None:
        raise RuntimeError("no CUDA device to compile the plugin kernel for; pass a capability")
    return default


def summary(kernel: PluginKernel) -> dict:
    """What a reader (or a test) wants to know about a compiled plugin kernel."""
    target = re.search(r"\.target\s+(\S+)", kernel.ptx)
    return {
        "name": kernel.name,
        "params": entry_params(kernel.ptx, kernel.name),
        "shared_mem": kernel.shared_mem,
        "num_warps": kernel.num_warps,
        "tile": [kernel.block_m, kernel.block_n, kernel.num_stages],
        "target": target.group(1) if target else None,
        "ptx_version": ptx_isa_version(kernel.ptx),
        "wgmma": "wgmma" in kernel.ptx,
        "ptx_bytes": len(kernel.ptx),
    }


def main(argv=None) -> int:
    """``python -m infiniteid.kernels.plugin_ptx``: compile the plugin kernel, print a JSON summary."""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile the mixed-attention TensorRT plugin kernel to PTX.")
    ap.add_argument("--dtype", default="float16", choices=sorted(TRITON_DTYPES))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--scale", type=float, default=None, help="softmax scale (default 1/sqrt(head dim))")
    ap.add_argument("--no-adain", action="store_true")
    ap.add_argument("--even-tokens", action="store_true", help="token count fills whole tiles: no tail masks")
    ap.add_argument("--capability", default="9.0", help="compute capability, e.g. 9.0")
    ap.add_argument("--ptx", help="also write the PTX to this file")
    args = ap.parse_args(argv)
    major, minor = (int(x) for x in args.capability.split("."))
    scale = args.scale if args.scale is not None else 1.0 / math.sqrt(args.head_dim)
    kernel = pick_kernel(args.dtype, args.head_dim, scale, not args.no_adain, args.even_tokens, (major, minor))
    if args.ptx:
        with open(args.ptx, "w") as f:
            f.write(kernel.ptx)
    print(json.dumps(summary(kernel)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
