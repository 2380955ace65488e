"""Polygraphy as the second executor and second comparator of ``infiniteid check``.

``infiniteid check BUNDLE --against polygraphy`` runs the reference side with
NVIDIA's Polygraphy instead of our own backends, so our engine runner, bindings
and shape handling are checked by independent, tested code:

* ``onnxrt``: the bundle's ONNX files through Polygraphy's ``OnnxrtRunner``
  (``SessionFromOnnx``); runs anywhere onnxruntime does;
* ``trt``: the very plan files our TensorRT backend loads (after the same sidecar
  checks, :mod:`.engine_check`), deserialised by Polygraphy's ``EngineFromBytes``
  and run by its ``TrtRunner`` (its own bindings, buffers and shape handling).

:func:`polygraphy_errors` runs Polygraphy's ``Comparator.compare_accuracy`` on the
two sides' outputs; its absolute-error statistics are reported next to ours and
must agree with them (a disagreement means one of the two comparators is wrong).

:func:`save_failure_case` writes a failing component's inputs and both sides'
outputs in Polygraphy's JSON formats (``polygraphy run --load-inputs`` /
``--load-outputs``), so ``polygraphy run`` and ``polygraphy debug`` can take the
case further; without Polygraphy installed it writes one ``.npz`` instead.

Polygraphy is imported lazily (it is in the ``[gpu]`` and ``[test]`` extras). Torch-free.
"""
from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from ..runtime.backend import BackendError, Feeds, Outputs

RUNNERS = ("auto", "onnxrt", "trt")


def import_polygraphy() -> Any:
    try:
        import polygraphy
    except ImportError:
        raise BackendError("--against polygraphy needs Polygraphy: pip install 'polygraphy>=0.49'") from None
    return polygraphy


@contextlib.contextmanager
def quiet_polygraphy(level: str = "WARNING") -> Iterator[None]:
    """Polygraphy logs every step at INFO; keep only messages at ``level`` and above."""
    from polygraphy.logger import G_LOGGER

    before = G_LOGGER.module_severity
    G_LOGGER.module_severity = getattr(G_LOGGER, level)
    try:
        yield
    finally:
        G_LOGGER.module_severity = before


def cast_feeds(spec: Any, feeds: Feeds) -> Dict[str, np.ndarray]:
    """``feeds`` in the dtypes the component's graph declares (Polygraphy checks them strictly)."""
    declared = {t.name: t for t in spec.inputs}
    missing = sorted(set(declared) - set(feeds))
    extra = sorted(set(feeds) - set(declared))
    if missing or extra:
        raise BackendError(f"{spec.name}: wrong inputs (missing {missing}, unknown {extra}); it takes {sorted(declared)}")
    return {n: np.ascontiguousarray(feeds[n], dtype=np.dtype(t.dtype)) for n, t in declared.items()}


class PolygraphyBackend:
    """Runs bundle components with Polygraphy's runners (``run(component, feeds)``, ``close()``).

    ``runner``: ``"onnxrt"`` (the ONNX files) or ``"trt"`` (the bundle's engines for
    this GPU, or those in ``engine_dir``). ``providers``: onnxruntime providers for
    ``onnxrt`` (default: the ones the project's onnxruntime backend would pick).
    """

    name = "polygraphy"

    def __init__(self, bundle: Any, *, runner: str = "onnxrt", components: Optional[Sequence[str]] = None,
                 engine_dir: Optional[str] = None, providers: Optional[Sequence[str]] = None, device: int = 0):
        if runner not in ("onnxrt", "trt"):
            raise BackendError(f"polygraphy runner must be onnxrt or trt, got {runner!r}")
        import_polygraphy()
        self.bundle = bundle
        self.kind = runner
        self._runners: Dict[str, Any] = {}
        self._plans: Dict[str, Path] = {}
        self._runtime: Any = None
        if runner == "onnxrt":
            if providers is None:
                import onnxruntime as ort

                from ..runtime.ort_backend import default_providers

                providers = default_providers(ort.get_available_providers())
            self.providers = list(providers)
        else:
            self._setup_engines(components, engine_dir, device)

    def _setup_engines(self, components: Optional[Sequence[str]], engine_dir: Optional[str], device: int) -> None:
        from ..contract import COMPONENTS
        from . import cuda
        from .engine_check import Target, find_engine_folder, load_sidecars
        from .names import plan_path

        try:
            import tensorrt as trt  # Polygraphy's TrtRunner uses the full package, not tensorrt_lean
        except ImportError:
            raise BackendError("--against polygraphy with its TensorRT runner needs TensorRT: "
                               "pip install 'tensorrt>=10.9'") from None
        cuda.require_device(device)  # before TensorRT: its runtime crashes on a machine without a GPU
        target = Target(cuda.device_info(device), str(trt.__version__))
        folder = Path(engine_dir).expanduser() if engine_dir else find_engine_folder(self.bundle.path, target)
        comps = list(components or COMPONENTS)
        sidecars, _ = load_sidecars(self.bundle.path, folder, self.bundle.manifest, comps, target)
        self._plans = {c: plan_path(folder, c) for c in comps}
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if any(s.version_compatible for s in sidecars.values()):
            runtime.engine_host_code_allowed = True
        self._runtime = runtime
        self.folder = folder

    def _runner(self, component: str) -> Any:
        if component in self._runners:
            return self._runners[component]
        if self.kind == "onnxrt":
            from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

            runner = OnnxrtRunner(SessionFromOnnx(str(self.bundle.onnx_path(component)), providers=self.providers),
                                  name=f"polygraphy-onnxrt:{component}")
        else:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            if component not in self._plans:
                raise BackendError(f"no engine for {component!r} was loaded (have: {', '.join(self._plans)})")
            loader = EngineFromBytes(self._plans[component].read_bytes(), runtime=self._runtime)
            runner = TrtRunner(loader, name=f"polygraphy-trt:{component}")
        with quiet_polygraphy():
            try:
                runner.activate()
            except Exception as e:  # Polygraphy raises PolygraphyException with the runtime's reason
                raise BackendError(f"polygraphy could not load {component!r}: {str(e).strip().splitlines()[-1]}") from None
        self._runners[component] = runner
        return runner

    def run(self, component: str, feeds: Feeds) -> Outputs:
        runner = self._runner(component)
        ready = cast_feeds(self.bundle.component(component), feeds)
        with quiet_polygraphy():
            try:
                values = runner.infer(ready)
            except Exception as e:
                raise BackendError(f"polygraphy failed running {component!r}: {str(e).strip().splitlines()[-1]}") from None
        out: Outputs = {}
        for n, v in values.items():
            v = np.array(v)  # TrtRunner may hand out views of its own host buffers
            out[n] = v.astype(np.float32) if v.dtype in (np.float16, np.float64) else v
        return out

    def close(self) -> None:
        with quiet_polygraphy():
            for r in self._runners.values():
                try:
                    r.deactivate()
                except Exception:
                    pass
        self._runners.clear()
        self._runtime = None

    def describe(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"backend": self.name, "runner": self.kind}
        if self.kind == "onnxrt":
            d["providers"] = self.providers
        else:
            d["engines"] = str(self.folder)
        return d


# -- Polygraphy's comparator ------------------------------------------------------------------------------
def polygraphy_errors(candidate: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                      names: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """Per output: Polygraphy's ``max_absdiff`` and ``mean_absdiff`` from ``Comparator.compare_accuracy``."""
    from polygraphy.comparator import Comparator, IterationResult, RunResults

    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # Polygraphy before 0.50
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple

    common = [n for n in names if n in candidate and n in reference]
    a = {n: np.asarray(candidate[n], dtype=np.float64) for n in common}
    b = {n: np.asarray(reference[n], dtype=np.float64) for n in common}
    results = RunResults([("candidate", [IterationResult(a, runner_name="candidate")]),
                          ("reference", [IterationResult(b, runner_name="reference")])])
    # only its statistics are used (the verdict is ours), so its pass/fail lines at its default tolerance stay silent
    with quiet_polygraphy("CRITICAL"):
        acc = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(check_shapes=True))
    [per_iteration] = list(acc[0].dct.values())
    out: Dict[str, Dict[str, float]] = {}
    for n, r in per_iteration[0].items():
        out[n] = {"max_absdiff": float(r.max_absdiff), "mean_absdiff": float(r.mean_absdiff)}
    return out


def disagreements(ours: Sequence[Any], theirs: Mapping[str, Mapping[str, float]], rtol: float = 1e-6) -> List[str]:
    """Where Polygraphy's absolute errors differ from ours (``ErrorStats``) by more than float rounding."""
    out = []
    for s in ours:
        t = theirs.get(s.name)
        if t is None or not np.isfinite(s.max_abs):
            continue
        for mine, key in ((s.max_abs, "max_absdiff"), (s.mean_abs, "mean_absdiff")):
            if not np.isclose(mine, t[key], rtol=rtol, atol=1e-12):
                out.append(f"{s.name}: polygraphy's {key} {t[key]:.6g} differs from ours {mine:.6g}")
    return out


# -- failure cases ------------------------------------------------------------------------------------------
def _as_declared(spec: Any, outputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Outputs in the graph's own dtypes (what ``polygraphy run`` on that graph produces)."""
    declared = {t.name: np.dtype(t.dtype) for t in spec.outputs}
    return {n: np.asarray(v).astype(declared.get(n, np.asarray(v).dtype)) for n, v in outputs.items()}


def save_failure_case(folder: Path, component: str, feeds: Feeds, candidate: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray], bundle_a: Any, bundle_b: Any,
                      sides: Sequence[str] = ("candidate", "reference")) -> List[Path]:
    """Write a failing component's inputs and both outputs; returns the files written.

    With Polygraphy: ``<component>.inputs.json`` (``--load-inputs``) and
    ``<component>.<side>.outputs.json`` (``--load-outputs``), inputs in the candidate
    graph's dtypes and each side's outputs in its own graph's dtypes. Without it:
    ``<component>.npz`` with ``input.*``, ``candidate.*`` and ``reference.*`` arrays.
    """
    from .names import write_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_a, spec_b = bundle_a.component(component), bundle_b.component(component)
    inputs = cast_feeds(spec_a, feeds)
    try:
        from polygraphy.comparator import IterationResult, RunResults
        from polygraphy.json import save_json
    except ImportError:
        path = folder / f"{component}.npz"
        arrays = {f"input.{n}": v for n, v in inputs.items()}
        arrays.update({f"candidate.{n}": v for n, v in _as_declared(spec_a, candidate).items()})
        arrays.update({f"reference.{n}": v for n, v in _as_declared(spec_b, reference).items()})
        write_atomic(path, lambda f: np.savez(f, **arrays))
        return [path]
    written = [folder / f"{component}.inputs.json"]
    with quiet_polygraphy():
        save_json([inputs], str(written[0]), description="check inputs")
        for side, spec, outputs in ((sides[0], spec_a, candidate), (sides[1], spec_b, reference)):
            path = folder / f"{component}.{side}.outputs.json"
            RunResults([(side, [IterationResult(_as_declared(spec, outputs), runner_name=side)])]).save(str(path))
            written.append(path)
    return written


def replay_command(bundle: Any, component: str, files: Sequence[Path]) -> str:
    """The ``polygraphy run`` line that reruns a saved case on the candidate's ONNX and compares."""
    if len(files) < 3:
        return ""
    onnx = shlex.quote(str(bundle.onnx_path(component)))
    return (f"polygraphy run {onnx} --onnxrt --load-inputs {shlex.quote(str(files[0]))} "
            f"--load-outputs {shlex.quote(str(files[2]))}")
