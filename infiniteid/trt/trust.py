"""Which TensorRT plans may run host code: that is an explicit choice, not a side effect of loading.

Most plans are data for TensorRT's kernels. Two kinds carry code that runs in
the loading process: a **version-compatible** plan embeds a TensorRT lean
runtime library, and a plan built with ``IBuilderConfig.plugins_to_serialize``
embeds plugin libraries. TensorRT loads them only when
``Runtime.engine_host_code_allowed`` is True. The runtime sets it, plan by plan,
only when :func:`allow_host_code` says so:

* the plan carries no host code (by its sidecar): not allowed, and not needed.
  A sidecar that hides host code gains nothing: TensorRT then refuses the plan;
* the user passed ``--trust-engine-code`` / ``trust_engine_code=True``: allowed;
* the sidecar shows the plan was built on this machine: its ``plan_sha256`` is
  the plan file's and its ``built_here`` tag verifies under this machine's key
  (:mod:`infiniteid.provenance`): allowed;
* otherwise an :class:`EngineCodeRefused` that says what the flag allows, why it
  is needed, and how to rebuild here instead.

Pure functions (the plan's hash is passed in lazily, computed only when it
decides); TensorRT- and torch-free.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

from .. import provenance
from ..runtime.backend import BackendError
from .names import EngineSidecar

PROVENANCE_KIND = "tensorrt-plan"


class EngineCodeRefused(BackendError):
    """A plan that would run host code the user has not agreed to."""


def host_code(sidecar: EngineSidecar) -> List[str]:
    """What code the plan carries, by its sidecar (empty: none)."""
    out = []
    if sidecar.version_compatible:
        out.append("an embedded TensorRT lean runtime library (a version-compatible plan)")
    plugins = sidecar.build.get("plugins_to_serialize") or []
    if plugins:
        out.append(f"serialised plugin libraries ({', '.join(str(p) for p in plugins)})")
    return out


def built_here_tag(plan_sha256: str) -> str:
    """The sidecar's ``built_here`` for a plan this machine built (see :mod:`infiniteid.provenance`)."""
    return provenance.tag(PROVENANCE_KIND, plan_sha256)


def built_here(sidecar: EngineSidecar, plan_sha256: str) -> bool:
    """The sidecar records this plan's hash and carries this machine's tag for it."""
    return bool(sidecar.plan_sha256) and sidecar.plan_sha256 == plan_sha256 and \
        provenance.made_here(PROVENANCE_KIND, plan_sha256, sidecar.built_here)


def allow_host_code(
    name: str,
    sidecar: EngineSidecar,
    plan_sha256: Callable[[], str],
    trust_engine_code: bool,
    where: Any,
    rebuild: Optional[str] = None,
) -> bool:
    """The value of ``engine_host_code_allowed`` for this plan, or :class:`EngineCodeRefused`.

    ``plan_sha256`` returns the plan file's sha256; it is called only when the
    plan carries host code and the user did not pass the trust flag.
    """
    carries = host_code(sidecar)
    if not carries:
        return False
    if trust_engine_code:
        return True
    if built_here(sidecar, plan_sha256()):
        return True
    fix = f"; or build the engines on this machine: {rebuild}" if rebuild else ""
    raise EngineCodeRefused(
        f"{where}: the {name} engine carries host code ({'; '.join(carries)}) that TensorRT would run inside this "
        "process, and its sidecar does not show it was built on this machine. Pass --trust-engine-code "
        "(trust_engine_code=True) to let TensorRT load host code from this bundle's plans, only if you trust "
        f"whoever built them{fix}"
    )
