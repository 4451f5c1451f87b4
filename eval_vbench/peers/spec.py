"""Method specs for side-by-side comparisons: the base classes every peer module builds on and the parsing of
a spec's values (`parse_method`, in the package, hands a spec to its library's module by its first field).

A spec is a short string (`diffusers:fbcache:0.08`) parsed into a small validated dataclass. Every
method can `apply` itself to a loaded pipeline and returns an `AppliedMethod` that removes it again
and reports what it kept in memory. cache-dit patches pipeline classes for the whole process, so its
methods declare `isolated = True` and the comparison runs each of them in a process of its own.

Under sequence or CFG parallelism (`videocache compare --ulysses N ...` under accelerate launch) the
comparison's worker applies a method and then `videocache.distributed.parallelize` (the cache first, as
diffusers' caches and CFG parallelism need), except for a method whose `parallel_impl` is "own": cache-dit
cannot run under videocache's parallelism and is run with its own context parallelism at the same degrees
(`parallelize_pipeline`). diffusers' First-Block-Cache decides from the local token shard: its decision is
replaced by the agreed global one (`videocache.distributed.peers`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from videocache.family import PeerSettings
from videocache.family import family_of as family_of_model

VALID_FORMS = (
    "none",
    "videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise]",
    "diffusers:fbcache:THRESHOLD",
    "diffusers:taylorseer:INTERVAL[:attn]",
    "diffusers:magcache:THRESHOLD",
    "diffusers:pab:RANGE",
    "diffusers:pab:SPATIAL:TEMPORAL:CROSS",
    "cachedit:dbcache:Fn:Bn:THRESHOLD",
    "cachedit:dbcache-taylorseer:Fn:Bn:THRESHOLD[:ORDER]",
)
# Share of the steps every peer keeps uncached at the start (MagCache's retention ratio, used for
# cache-dit's warm-up too so that the peers are compared at the same warm-up).
WARMUP_FRACTION = 0.2


class MethodSpecError(ValueError):
    """A spec that cannot be parsed; the message is one line and lists the valid forms."""


def spec_error(spec: str, why: str | None = None) -> MethodSpecError:
    """The one-line error for `spec`, listing the valid forms."""
    head = f"bad method spec {spec!r}: {why}" if why else f"unknown method spec {spec!r}"
    return MethodSpecError(f"{head}; valid forms: {', '.join(VALID_FORMS)}")


# -- what a method needs from the comparison and what it gives back ---------------------------------------
@dataclass
class MethodSetup:
    """What `apply` may use besides the pipeline.

    `calibrate()` runs one generation of the comparison's first prompt and seed with whatever is
    applied to the pipeline at that moment (MagCache learns its ratios this way); `store` persists
    small results such as those ratios across reruns of the same comparison.
    """

    num_inference_steps: int
    calibrate: Callable[[], None] = lambda: None
    store: dict[str, Any] = field(default_factory=dict)
    save_store: Callable[[], None] = lambda: None
    parallel: Any = None  # videocache.distributed.ParallelSettings of a parallel comparison (None: one process)


@dataclass
class AppliedMethod:
    """A method switched on; `remove()` restores the uncached pipeline."""

    remove: Callable[[], None]
    cache_bytes: Callable[[], int] | None = None  # bytes held now, sampled after every transformer call
    stats: Callable[[], dict[str, Any]] = dict  # the method's own report (videocache: engine.stats())
    reset_stats: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)  # settings that actually ran (e.g. calibrated ratios)


# -- value parsing ------------------------------------------------------------------------------------
def positive_float(spec: str, name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise spec_error(spec, f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise spec_error(spec, f"{name} must be a positive number, got {text!r}")
    return value


def int_at_least(spec: str, name: str, text: str, minimum: int) -> int:
    if not re.fullmatch(r"\d+", text):
        raise spec_error(spec, f"{name} must be an integer >= {minimum}, got {text!r}")
    value = int(text)
    if value < minimum:
        raise spec_error(spec, f"{name} must be an integer >= {minimum}, got {text!r}")
    return value


# -- methods -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """Base of every method spec."""

    family: ClassVar[str] = ""
    isolated: ClassVar[bool] = False  # True: must run in a process of its own
    # who spreads the transformer over the ranks in a parallel comparison: "videocache" (the worker calls
    # parallelize after apply, per run) or "own" (the method's parallelize_pipeline, once per worker)
    parallel_impl: ClassVar[str] = "videocache"

    @property
    def spec(self) -> str:  # canonical form, used as the method's name in reports
        raise NotImplementedError

    @property
    def label(self) -> str:
        """Short label for plots."""
        return self.spec.split(":", 1)[-1]

    @property
    def kind(self) -> str:
        """Marker family for plots and reports: the family, unless a method tells its variants apart."""
        return self.family

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        raise NotImplementedError

    def config_digest(self) -> str:
        """What the spec does not pin down (a profile file's contents): a resumed comparison reruns a
        method whose digest changed. Empty when the spec says everything."""
        return ""

    def parallelize_pipeline(self, pipe: Any, setup: MethodSetup) -> dict[str, Any]:
        """For parallel_impl "own": spread the pipeline over the ranks with the method's own parallelism,
        once per worker process, leaving it uncached (the uncached runs of that worker then run on it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoCache(Method):
    """The uncached reference run."""

    family: ClassVar[str] = "none"

    @property
    def spec(self) -> str:
        return "none"

    @property
    def label(self) -> str:
        return "none"

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        return AppliedMethod(remove=lambda: None, cache_bytes=lambda: 0)




def family_of(method: Method) -> str:
    """Marker family for plots and reports (DBCache with and without its calibrator are distinct)."""
    return method.kind


def family_peers(transformer: Any) -> tuple[str, PeerSettings]:
    """The transformer's model family name and its peer settings (`videocache.family.PeerSettings`; empty
    settings where it declares none: the libraries' defaults)."""
    family = family_of_model(transformer)
    return family.name, family.peers or PeerSettings()
