"""Error statistics between two arrays: how far one backend's output is from another's.

``infiniteid check`` runs the same inputs through two backends (TensorRT against
onnxruntime, an fp16 bundle against an fp32 one) and reports, per output tensor,
the numbers an engineer looks at first:

* ``max_abs`` / ``mean_abs``: absolute error ``|a - b|``;
* ``max_rel`` / ``mean_rel``: elementwise relative error ``|a - b| / max(|b|, floor)``.
  A plain ``|a - b| / |b|`` explodes where the reference crosses zero, which says
  nothing about the output's quality; the floor is ``rel_floor`` times the
  reference's largest magnitude (default 1e-3), and it is reported with the numbers;
* ``rel_l2``: ``||a - b|| / ||b||``, one robust number for the whole tensor;
* ``cosine``: cosine similarity of the flattened tensors (1.0 = same direction);
* non-finite counts: a NaN or Inf in either output is a failure whatever the rest says.

``b`` is the reference. Everything is computed in float64 from whatever dtypes
come in, so float16 outputs compare on equal terms. Numpy only (torch-free).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

DEFAULT_REL_FLOOR = 1e-3


@dataclass
class ErrorStats:
    """How ``candidate`` differs from ``reference`` for one tensor."""

    name: str
    shape: Tuple[int, ...]
    candidate_dtype: str
    reference_dtype: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    rel_l2: float
    cosine: float
    reference_max_abs: float
    rel_floor: float
    nonfinite_candidate: int
    nonfinite_reference: int

    @property
    def finite(self) -> bool:
        return self.nonfinite_candidate == 0 and self.nonfinite_reference == 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["finite"] = self.finite
        # JSON has no NaN/Inf: write them as strings so the file stays valid JSON.
        return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0  # both all-zero: identical
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare_arrays(
    candidate: np.ndarray,
    reference: np.ndarray,
    name: str = "",
    rel_floor: float = DEFAULT_REL_FLOOR,
) -> ErrorStats:
    """Error statistics of ``candidate`` against ``reference`` (same shape required)."""
    a = np.asarray(candidate)
    b = np.asarray(reference)
    if a.shape != b.shape:
        raise ValueError(f"{name or 'tensor'}: shapes differ: candidate {list(a.shape)} vs reference {list(b.shape)}")
    if rel_floor <= 0:
        raise ValueError(f"rel_floor must be > 0, got {rel_floor}")
    a64 = a.astype(np.float64).ravel()
    b64 = b.astype(np.float64).ravel()
    bad_a = int(np.count_nonzero(~np.isfinite(a64)))
    bad_b = int(np.count_nonzero(~np.isfinite(b64)))
    if a64.size == 0:  # an empty tensor agrees with an empty tensor
        return ErrorStats(name, tuple(a.shape), str(a.dtype), str(b.dtype), 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0,
                          rel_floor, 0, 0)
    if bad_a or bad_b:
        nan = float("nan")
        ref_max = float(np.max(np.abs(b64[np.isfinite(b64)]))) if bad_b < b64.size else nan
        return ErrorStats(name, tuple(a.shape), str(a.dtype), str(b.dtype), nan, nan, nan, nan, nan, nan, ref_max,
                          rel_floor, bad_a, bad_b)
    diff = np.abs(a64 - b64)
    ref_abs = np.abs(b64)
    ref_max = float(ref_abs.max())
    floor = max(rel_floor * ref_max, np.finfo(np.float64).tiny)
    rel = diff / np.maximum(ref_abs, floor)
    norm_b = float(np.linalg.norm(b64))
    norm_d = float(np.linalg.norm(a64 - b64))
    rel_l2 = norm_d / norm_b if norm_b > 0 else (0.0 if norm_d == 0 else float("inf"))
    return ErrorStats(
        name=name,
        shape=tuple(a.shape),
        candidate_dtype=str(a.dtype),
        reference_dtype=str(b.dtype),
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        max_rel=float(rel.max()),
        mean_rel=float(rel.mean()),
        rel_l2=rel_l2,
        cosine=_cosine(a64, b64),
        reference_max_abs=ref_max,
        rel_floor=rel_floor,
        nonfinite_candidate=0,
        nonfinite_reference=0,
    )


@dataclass
class Tolerance:
    """When a comparison passes. ``None`` leaves a statistic unchecked.

    Non-finite values always fail. The defaults suit fp16 against fp32 on
    diffusion models: the direction must agree (cosine) and the whole-tensor
    relative error stay small; elementwise maxima are reported, not judged,
    since one outlier pixel out of millions is normal for fp16.
    """

    min_cosine: Optional[float] = 0.999
    max_rel_l2: Optional[float] = 0.05
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None

    def validate(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        for k in ("max_rel_l2", "max_abs", "max_rel"):
            v = getattr(self, k)
            if v is not None and not v >= 0:
                raise ValueError(f"{k} must be >= 0, got {v}")

    def failures(self, s: ErrorStats) -> List[str]:
        """Why ``s`` fails (empty when it passes)."""
        out: List[str] = []
        if not s.finite:
            out.append(
                f"non-finite values (candidate {s.nonfinite_candidate}, reference {s.nonfinite_reference})"
            )
            return out
        if self.min_cosine is not None and s.cosine < self.min_cosine:
            out.append(f"cosine {s.cosine:.6f} < {self.min_cosine}")
        if self.max_rel_l2 is not None and s.rel_l2 > self.max_rel_l2:
            out.append(f"rel_l2 {s.rel_l2:.3g} > {self.max_rel_l2}")
        if self.max_abs is not None and s.max_abs > self.max_abs:
            out.append(f"max_abs {s.max_abs:.3g} > {self.max_abs}")
        if self.max_rel is not None and s.max_rel > self.max_rel:
            out.append(f"max_rel {s.max_rel:.3g} > {self.max_rel}")
        return out


@dataclass
class ComponentReport:
    """All outputs of one component, compared."""

    component: str
    stats: List[ErrorStats]
    failures: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not any(self.failures.values())


def compare_outputs(
    component: str,
    candidate: Dict[str, np.ndarray],
    reference: Dict[str, np.ndarray],
    tolerance: Tolerance,
    rel_floor: float = DEFAULT_REL_FLOOR,
) -> ComponentReport:
    """Compare every output the reference has; a missing candidate output is a failure."""
    stats: List[ErrorStats] = []
    failures: Dict[str, List[str]] = {}
    for name in reference:
        if name not in candidate:
            failures[name] = [f"candidate has no output {name!r} (it has {sorted(candidate)})"]
            continue
        s = compare_arrays(candidate[name], reference[name], name=name, rel_floor=rel_floor)
        stats.append(s)
        failures[name] = tolerance.failures(s)
    return ComponentReport(component, stats, failures)


_COLUMNS = (
    ("component", 15), ("output", 16), ("shape", 18), ("max_abs", 10), ("mean_abs", 10),
    ("max_rel", 10), ("mean_rel", 10), ("rel_l2", 10), ("cosine", 10), ("result", 6),
)


def _fmt(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3e}"


def format_table(reports: Sequence[ComponentReport]) -> str:
    """A fixed-width table, one row per output, then the reason of every failure."""
    head = " ".join(f"{n:<{w}}" for n, w in _COLUMNS)
    lines = [head, "-" * len(head)]
    notes: List[str] = []
    for r in reports:
        by_name = {s.name: s for s in r.stats}
        for name, why in r.failures.items():
            s = by_name.get(name)
            ok = "ok" if not why else "FAIL"
            if s is None:
                cells = [r.component, name, "-"] + ["-"] * 6 + [ok]
            else:
                cos = f"{s.cosine:.6f}" if math.isfinite(s.cosine) else str(s.cosine)
                cells = [r.component, name, "x".join(map(str, s.shape)), _fmt(s.max_abs), _fmt(s.mean_abs),
                         _fmt(s.max_rel), _fmt(s.mean_rel), _fmt(s.rel_l2), cos, ok]
            lines.append(" ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, _COLUMNS)))
            notes.extend(f"  {r.component}.{name}: {w}" for w in why)
    if notes:
        lines.append("failures:")
        lines.extend(notes)
    return "\n".join(lines)


def reports_to_json(reports: Iterable[ComponentReport], **meta) -> str:
    """The reports (and any ``meta`` such as backends and bundles) as a JSON document."""
    doc = dict(meta)
    doc["components"] = [
        {
            "component": r.component,
            "passed": r.passed,
            "outputs": [s.to_dict() for s in r.stats],
            "failures": {k: v for k, v in r.failures.items() if v},
        }
        for r in reports
    ]
    return json.dumps(doc, indent=2)
