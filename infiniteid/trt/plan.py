"""What ``infiniteid build`` does, engine by engine, with the TensorRT call passed in.

Everything a build decides is here and runs without TensorRT: which engines
(the five components and the guidance + step graphs), the precision check
(strongly typed networks take their precision from the ONNX, so an fp32 bundle
cannot become an fp16 engine), the optimisation profiles, whether an engine is
already up to date, where plans and sidecars go and that they are written
atomically. The TensorRT work itself is one function, ``build_fn(job, folder)``,
supplied by :mod:`.builder` (or by a test, which cannot run TensorRT).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from ..bundle import ENGINES_DIR, ComponentSpec, Manifest, inside_bundle
from ..contract import COMPONENTS, UNET, VAE_DECODER
from .engine_check import Target, build_command, component_digest, version_ok
from .names import (
    TIMING_CACHE,
    EngineError,
    EngineSidecar,
    Profile,
    check_engine_folder,
    engine_folder,
    plan_path,
    profiles_to_json,
    read_sidecar,
    sidecar_path,
    write_atomic,
    write_sidecar,
)
from .profiles import ShapePlan, component_profiles
from .step_graph import StepGraphSpec, make_step_model, step_graph_key, step_tensor_specs
from .trust import built_here_tag

PRECISIONS = ("fp32", "fp16", "int8", "fp8")
#: Precisions that come from Q/DQ nodes in the U-Net (written by ``infiniteid calibrate``).
QUANTIZED = ("int8", "fp8")
#: Components whose precision follows --precision; the VAE stays as exported (fp32 unless asked at export).
FOLLOWS_PRECISION = tuple(c for c in COMPONENTS if c != VAE_DECODER)
#: ONNX files up to this size are opened to look for the plugin's custom domain.
PLUGIN_SCAN_LIMIT = 256 << 20


class BuildError(ValueError):
    """A build that cannot go ahead as asked; the message says why and what to do."""


@dataclass
class BuildOptions:
    """The flags of ``infiniteid build`` (see the command's help)."""

    precision: Optional[str] = None  # None: as exported; else checked against the bundle
    shapes: str = "static"
    height: Optional[int] = None
    width: Optional[int] = None
    images: int = 1
    cfg: bool = True  # static engines for CFG batches; False: guidance-1 batches (few-step bases), half the U-Net batch
    opt_level: int = 3
    timing_cache: Optional[str] = None  # default: <engine folder>/timing.cache
    workspace_gb: Optional[float] = None
    version_compatible: bool = False
    components: Optional[Sequence[str]] = None  # None: all components and the step graphs
    step_graphs: bool = True
    force: bool = False

    def validate(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be an integer from 0 to 5 (TensorRT's range), got {self.opt_level!r}")
        if self.workspace_gb is not None and not self.workspace_gb > 0:
            raise BuildError(f"--workspace must be a positive number of GiB, got {self.workspace_gb!r}")
        if not isinstance(self.images, int) or self.images < 1:
            raise BuildError(f"--images must be a positive integer, got {self.images!r}")
        if self.shapes == "dynamic" and (self.height or self.width or self.images != 1):
            raise BuildError("--height/--width/--images choose the static shape; dynamic engines take the "
                             "manifest's ranges (drop them, or use --shapes static)")
        if self.shapes == "dynamic" and not self.cfg:
            raise BuildError("--no-cfg chooses the static shape; dynamic engines take batches with and without CFG "
                             "(drop it, or use --shapes static)")
        for c in self.components or ():
            if c not in COMPONENTS:
                raise BuildError(f"unknown component {c!r}; choose from {', '.join(COMPONENTS)}")

    def shape_plan(self, manifest: Manifest) -> ShapePlan:
        return ShapePlan.for_manifest(manifest, self.shapes, self.height, self.width, self.images, self.cfg)

    def flags(self, plan: ShapePlan) -> Dict[str, Any]:
        """What goes into every sidecar's ``build`` (and back into the rebuild command)."""
        d: Dict[str, Any] = {"precision": self.precision, **plan.flags(), "opt_level": self.opt_level,
                             "workspace_gb": self.workspace_gb, "version_compatible": self.version_compatible}
        if self.timing_cache:
            d["timing_cache"] = self.timing_cache
        return d


@dataclass
class EngineJob:
    """One engine to build: from which ONNX, with which profiles."""

    name: str
    spec: ComponentSpec
    onnx_path: Path
    onnx_sha256: str
    precision: str
    profiles: List[Profile]
    needs_plugin: bool = False
    step_graph: Optional[StepGraphSpec] = None
    #: ``MixedAttention`` nodes in the graph (None: not counted, the file is too big to open here)
    plugin_nodes: Optional[int] = None


@dataclass
class BuiltPlan:
    """What ``build_fn`` returns: the serialised engine (any bytes-like object) and its I/O as TensorRT sees it."""

    data: Any
    io: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes


@dataclass
class BuildReport:
    folder: Path
    built: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


def check_precision(manifest: Manifest, requested: Optional[str], components: Sequence[str], bundle: Any) -> None:
    """Refuse a precision the bundle's ONNX does not have (precision is the ONNX's, in strongly typed builds)."""
    if requested is None:
        return
    follow = [c for c in components if c in FOLLOWS_PRECISION]
    if requested in QUANTIZED:
        # INT8/FP8 come from the U-Net's Q/DQ nodes (infiniteid calibrate); the other graphs stay as exported.
        unet = manifest.components[UNET].precision
        if UNET in components and unet != requested:
            raise BuildError(
                f"--precision {requested} asked, but the bundle's U-Net is {unet}. {requested.upper()} engines are "
                f"built from a QDQ U-Net: run infiniteid calibrate ... --precision {requested} --bundle-out DIR, "
                f"then infiniteid build DIR --precision {requested}"
            )
        return
    if requested == "fp16":
        fp32 = [c for c in follow if manifest.components[c].precision == "fp32"]
        if fp32:
            raise BuildError(
                f"--precision fp16 asked, but the bundle's {', '.join(fp32)} ONNX is fp32. TensorRT builds "
                "strongly typed networks whose precision comes from the ONNX, so an fp32 export gives fp32 "
                f"engines: export the bundle with --precision fp16 (infiniteid export ... --precision fp16), "
                f"then run infiniteid build {bundle} --precision fp16"
            )
    else:  # fp32
        low = [c for c in components if manifest.components[c].precision != "fp32"]
        if low:
            raise BuildError(
                f"--precision fp32 asked, but the bundle's {', '.join(low)} ONNX is "
                f"{'/'.join(sorted({manifest.components[c].precision for c in low}))}: export with "
                "--precision fp32 for fp32 engines, or drop --precision to build what the bundle holds"
            )


def _load_small_graph(onnx_path: Path) -> Any:
    """The ModelProto without external weights, or None (no onnx here, too big to open, unreadable)."""
    try:
        import onnx
    except ImportError:
        return None
    if not onnx_path.is_file() or onnx_path.stat().st_size > PLUGIN_SCAN_LIMIT:
        return None  # big graphs: the export's "attention_plugin" option is the record
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # unreadable here: the parser will say so with a better message
        return None


def needs_plugin(spec: ComponentSpec, onnx_path: Path) -> bool:
    """Does the graph hold the project's custom attention node (so the plugin must be registered)?"""
    if spec.options.get("attention_plugin"):
        return True
    model = _load_small_graph(onnx_path)
    if model is None:
        return False
    from ..kernels.onnx_op import DOMAIN

    return any(imp.domain == DOMAIN for imp in model.opset_import)


def plugin_node_count(onnx_path: Path) -> Optional[int]:
    """How many ``MixedAttention`` nodes the graph holds (None when it cannot be opened here).

    The builder checks TensorRT made exactly that many plugin layers: a parser
    that imports the node's function body instead (or an unregistered plugin)
    would otherwise build a plain-ops engine without a word.
    """
    model = _load_small_graph(onnx_path)
    if model is None:
        return None
    from ..kernels.onnx_op import DOMAIN, OP_TYPE

    return sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE)


def plan_jobs(bundle_path: Path, manifest: Manifest, options: BuildOptions, plan: ShapePlan) -> List[EngineJob]:
    """The engines to build, in order (components first, then the step graphs)."""
    comps = list(options.components or COMPONENTS)
    check_precision(manifest, options.precision, comps, bundle_path)
    jobs: List[EngineJob] = []
    for c in comps:
        spec = manifest.components[c]
        path = inside_bundle(bundle_path, spec.file, f"components.{c}.file")
        plugin = needs_plugin(spec, path)
        jobs.append(EngineJob(c, spec, path, component_digest(spec), spec.precision, component_profiles(spec, plan),
                              needs_plugin=plugin, plugin_nodes=plugin_node_count(path) if plugin else None))
    if options.step_graphs and (options.components is None or UNET in comps):
        unet = manifest.components[UNET]
        variants = [plan.cfg] if plan.mode == "static" else [True, False]
        for cfg in variants:
            g = StepGraphSpec.for_unet(unet, cfg)
            spec = step_tensor_specs(g, unet)
            jobs.append(EngineJob(g.name, spec, Path(spec.file), step_graph_key(g), spec.precision,
                                  component_profiles(spec, plan), step_graph=g))
    return jobs


def up_to_date(job: EngineJob, folder: Path, target: Target, flags: Dict[str, Any]) -> bool:
    """An engine from an earlier build with the same inputs, flags and target can be kept."""
    try:
        sc = read_sidecar(sidecar_path(folder, job.name))
    except EngineError:
        return False
    p = plan_path(folder, job.name)
    return (
        sc.onnx_sha256 == job.onnx_sha256
        and version_ok(sc.tensorrt_version, target.trt_version, False)
        and sc.compute_capability == target.device.cc
        and _same_flags(sc.build, flags)
        and sc.profiles == profiles_to_json(job.profiles)
        and p.is_file()
        and p.stat().st_size == sc.plan_bytes
    )


def _same_flags(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Build flags equal, ignoring where the timing cache lives (it changes build time, not the engine)."""
    strip = lambda d: {k: v for k, v in d.items() if k != "timing_cache"}  # noqa: E731
    return strip(a) == strip(b)


def write_step_onnx(job: EngineJob, folder: Path) -> None:
    """Generate the step graph's ONNX next to its engine (kept for inspection and rebuilds)."""
    assert job.step_graph is not None
    model = make_step_model(job.step_graph)
    job.onnx_path = folder / f"{job.name}.onnx"
    write_atomic(job.onnx_path, model.SerializeToString())


def run_build(
    bundle_path: Path,
    manifest: Manifest,
    options: BuildOptions,
    target: Target,
    build_fn: Callable[[EngineJob, Path], BuiltPlan],
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Build (or keep) every engine; plans and sidecars land atomically in the target's folder."""
    options.validate()
    plan = options.shape_plan(manifest)
    jobs = plan_jobs(bundle_path, manifest, options, plan)
    folder = engine_folder(bundle_path, target.device, target.trt_version)
    inside_bundle(bundle_path, f"{ENGINES_DIR}/{folder.name}", f"{ENGINES_DIR}/{folder.name}", where=bundle_path)
    folder.mkdir(parents=True, exist_ok=True)
    check_engine_folder(bundle_path, folder)  # nothing written or read through a symlink leading out
    flags = options.flags(plan)
    report = BuildReport(folder=folder)
    bar = tqdm(jobs, desc="engines", unit="engine", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.name)
        if not options.force and up_to_date(job, folder, target, flags):
            report.skipped.append(job.name)
            continue
        if job.step_graph is not None:
            write_step_onnx(job, folder)
        t0 = time.perf_counter()
        built = build_fn(job, folder)
        seconds = time.perf_counter() - t0
        nbytes = built.nbytes
        write_atomic(plan_path(folder, job.name), lambda f: f.write(memoryview(built.data)))
        plan_sha256 = hashlib.sha256(memoryview(built.data)).hexdigest()
        rel_onnx = str(job.onnx_path.relative_to(bundle_path)) if job.onnx_path.is_relative_to(bundle_path) \
            else str(job.onnx_path)
        write_sidecar(folder, EngineSidecar(
            component=job.name,
            plan=plan_path(folder, job.name).name,
            plan_bytes=nbytes,
            tensorrt_version=target.trt_version,
            device=target.device.name,
            compute_capability=target.device.cc,
            onnx_file=rel_onnx,
            onnx_sha256=job.onnx_sha256,
            precision=job.precision,
            profiles=profiles_to_json(job.profiles),
            build=flags,
            build_seconds=round(seconds, 3),
            io=built.io,
            plan_sha256=plan_sha256,
            built_here=built_here_tag(plan_sha256),
        ))
        report.built.append(job.name)
        report.seconds[job.name] = seconds
    bar.close()
    return report


def default_timing_cache(folder: Path, options: BuildOptions) -> Path:
    return Path(options.timing_cache).expanduser() if options.timing_cache else Path(folder) / TIMING_CACHE


def rebuild_hint(bundle_path: Path, options: BuildOptions, manifest: Manifest) -> str:
    return build_command(bundle_path, options.flags(options.shape_plan(manifest)))


def describe_jobs(jobs: Sequence[EngineJob]) -> List[Dict[str, Any]]:
    """A JSON-friendly view of the plan (``infiniteid build --dry-run``)."""
    return [
        {"engine": j.name, "onnx": str(j.onnx_path), "precision": j.precision, "plugin": j.needs_plugin,
         "profiles": profiles_to_json(j.profiles), **({"step_graph": asdict(j.step_graph)} if j.step_graph else {})}
        for j in jobs
    ]
