"""Model families: everything videocache knows about one family of transformers, as one declaration.

A family (Wan, HunyuanVideo, Open-Sora 1.2, or one from another package) is a `ModelFamily` record: the
transformer classes it covers, the cache adapter, and each piece that some part of videocache needs, or
None where the family has none:

    piece             needed by                                         declared as
    parallel_plan     --ulysses / --ring / --cfg-parallel               transformer -> ParallelPlan
    attention_probe   the fg/bg stage of `videocache profile`           transformer -> an attention probe
    flop_points       `videocache compare` (measured computed fraction) transformer -> [FlopPoint]
    peers             the peer wrappers (TaylorSeer, PAB, cache-dit)    PeerSettings
    defaults          generation defaults for the CLI                   GenerationDefaults
    geometry          parallel checks before a model is loaded          (folder, frames, h, w) -> (heads, tokens)
    pipelines         pipeline classes of ours a folder may name        () -> [pipeline class]
    denoisers         pipelines with several transformers (experts)     pipe -> [Denoiser]; None: `transformer` alone
    models            models loadable by name                           {name: folder}

A run that needs a piece its family lacks gets a one-line `FamilyError` naming the piece (`require`);
nothing falls back to another family's values.

Families are found through the entry-point group `videocache.families` (each entry point names a
ModelFamily), so an installed package adds one without editing videocache, and through `register_family`
(in-process). A transformer belongs to the family that covers the nearest class in its MRO, so a renamed
subclass of a covered class is covered too.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ENTRY_POINT_GROUP = "videocache.families"
FORMULAS = ("self_attention", "grouped_attention", "cross_attention", "joint_attention", "feed_forward")
# what every adapter provides (videocache.adapters.ModelAdapter)
ADAPTER_METHODS = ("blocks", "component_modules", "fingerprint", "component_flops", "scheduler_sigmas", "denoiser_inputs")


class FamilyError(ValueError):
    """No family covers a model, or its family lacks a piece a run needs; the message is one line."""


@dataclass(frozen=True)
class GenerationDefaults:
    """Settings a model was made for; the CLI uses them where the user gave none."""

    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    fps: int

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width", "num_inference_steps", "fps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"generation defaults: {name} must be an integer >= 1; got {value!r}")


@dataclass(frozen=True)
class FlopPoint:
    """A module that runs exactly once per executed component (so a cache that serves the component skips it),
    and how to count that run's FLOPs from the module's first input, seen as (batch, tokens n, width d):

        self_attention     b * 2 (4 n d^2 + 2 n K d), K = n x the sequence-parallel degree (a rank's queries
                           attend to every rank's keys)
        grouped_attention  the same per group, K = n: attention within groups that each rank holds whole
        cross_attention    b * 2 (2 n d^2 + 2 m d^2 + 2 n m d), m = the context length
        joint_attention    self_attention over n + m tokens (`video_only`: the module sees the video tokens
                           and the m context tokens join them) or over n (the module sees them all)
        feed_forward       b * 2 (2 n d f), f = `width`

    m is read from the input `context_arg` (or the second positional argument) of `context`, a module called
    before `module` in the same component. `kind` names the component in reports."""

    kind: str
    module: torch.nn.Module
    formula: str
    width: int = 0
    context: torch.nn.Module | None = None
    context_arg: str = "encoder_hidden_states"
    video_only: bool = False

    def __post_init__(self) -> None:
        if self.formula not in FORMULAS:
            raise ValueError(f"FlopPoint {self.kind!r}: formula must be one of {', '.join(FORMULAS)}; got {self.formula!r}")
        if self.formula == "feed_forward" and self.width < 1:
            raise ValueError(f"FlopPoint {self.kind!r}: a feed_forward point needs its hidden width")
        if (self.formula == "cross_attention" or self.video_only) and self.context is None:
            raise ValueError(f"FlopPoint {self.kind!r}: a {self.formula} point needs the module that sees the context")


@dataclass(frozen=True)
class Denoiser:
    """One transformer of a pipeline that denoises some of its steps (Wan2.2 A14B: the high-noise expert
    `transformer`, then the low-noise `transformer_2`). `attribute`: where the pipeline holds it. `runs_at`:
    whether it denoises the step at a timestep (None: every step); the steps it runs must be consecutive.
    `guidance_scale`: the pipeline attribute holding the guidance scale it runs at (it picks the calibration
    made nearest to it where a profile has variants)."""

    attribute: str
    runs_at: Callable[[float], bool] | None = None
    guidance_scale: str = "guidance_scale"

    def __post_init__(self) -> None:
        if not isinstance(self.attribute, str) or not self.attribute.isidentifier():
            raise ValueError(f"a denoiser's attribute must be an attribute name; got {self.attribute!r}")


@dataclass(frozen=True)
class PeerSettings:
    """What the peer-method wrappers need to attach to this family where the libraries' defaults find nothing.

    `taylorseer_modules`: diffusers TaylorSeer's (cache_identifiers, skip_predict_identifiers) per scope,
    "components" (every cached component's output) and "attn" (attention only); None keeps diffusers'
    defaults. `pab_components`: adapter component name -> PAB attention kind ("spatial", "temporal",
    "cross"), for a transformer without diffusers `Attention` modules; `pab_window`: the (low, high)
    timestep window of the SPATIAL:TEMPORAL:CROSS form. `cachedit_blocks`: (attach(pipe) -> cache-dit
    BlockAdapter, detach(transformer)) where cache-dit cannot wrap the block lists as they are."""

    taylorseer_modules: Mapping[str, tuple[list[str] | None, list[str] | None]] = field(default_factory=dict)
    pab_components: Mapping[str, str] = field(default_factory=dict)
    pab_window: tuple[int, int] | None = None
    cachedit_blocks: tuple[Callable[[Any], Any], Callable[[torch.nn.Module], None]] | None = None


@dataclass(frozen=True)
class ModelFamily:
    """One family's declaration; see the module docstring for what each piece is for."""

    name: str
    transformers: tuple[str, ...]
    adapter: Any
    parallel_plan: Callable[[torch.nn.Module], Any] | None = None
    attention_probe: Callable[[torch.nn.Module], Any] | None = None
    flop_points: Callable[[torch.nn.Module], Sequence[FlopPoint]] | None = None
    peers: PeerSettings | None = None
    defaults: GenerationDefaults | None = None
    geometry: Callable[[str, int, int, int], tuple[int | None, int | None]] | None = None
    pipelines: Callable[[], Sequence[type]] | None = None
    models: Mapping[str, Path] = field(default_factory=dict)
    denoisers: Callable[[Any], Sequence[Denoiser]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a model family needs a name; got {self.name!r}")
        names = (self.transformers,) if isinstance(self.transformers, str) else tuple(self.transformers)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"family {self.name}: transformers must be transformer class names; got {self.transformers!r}")
        object.__setattr__(self, "transformers", names)
        missing = [m for m in ADAPTER_METHODS if not callable(getattr(self.adapter, m, None))]
        if missing:
            raise TypeError(f"family {self.name}: adapter {type(self.adapter).__name__} lacks {', '.join(missing)}")
        object.__setattr__(self, "models", {str(k): Path(v) for k, v in dict(self.models).items()})

    def require(self, piece: str, purpose: str) -> Any:
        """The piece, or a one-line FamilyError naming it and what needs it."""
        value = getattr(self, piece)
        if value is None:
            raise FamilyError(
                f"the {self.name} model family declares no {piece}, which {purpose} needs: add it to the family's "
                "ModelFamily declaration"
            )
        return value


_REGISTERED: dict[str, ModelFamily] = {}  # in-process registrations, by name
_DISCOVERED: dict[str, ModelFamily] | None = None  # entry points, loaded once


def register_family(family: ModelFamily) -> ModelFamily:
    """Register a family in this process (re-registering a name replaces it; it wins over an entry point)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily; got {type(family).__name__}")
    _REGISTERED[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _REGISTERED.pop(name, None)


def _discover() -> dict[str, ModelFamily]:
    found: dict[str, ModelFamily] = {}
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            family = point.load()
        except Exception as exc:  # one broken package must not take the others down; it is named
            warnings.warn(f"videocache: model family {point.name!r} ({point.value}) failed to load: {exc}", stacklevel=2)
            continue
        if not isinstance(family, ModelFamily):
            warnings.warn(f"videocache: entry point {point.name!r} ({point.value}) is not a ModelFamily", stacklevel=2)
            continue
        found.setdefault(family.name, family)
    return found


def families(refresh: bool = False) -> dict[str, ModelFamily]:
    """Every known family by name: the installed entry points, then in-process registrations over them.
    `refresh` reads the entry points again (after installing a package into a running process)."""
    global _DISCOVERED
    if _DISCOVERED is None or refresh:
        _DISCOVERED = _discover()
    return {**_DISCOVERED, **_REGISTERED}


def family_for_class(class_names: Sequence[str]) -> ModelFamily | None:
    """The family covering the first of these class names (a class's MRO, nearest first), or None."""
    by_class = {cls: fam for fam in families().values() for cls in fam.transformers}
    for name in class_names:
        if name in by_class:
            return by_class[name]
    return None


def family_of(transformer: torch.nn.Module) -> ModelFamily:
    """The family of a transformer (or of a torch.compile wrapper's module); a one-line FamilyError if none."""
    transformer = getattr(transformer, "_orig_mod", transformer)
    family = family_for_class([cls.__name__ for cls in type(transformer).__mro__])
    if family is None:
        covered = sorted(cls for fam in families().values() for cls in fam.transformers)
        raise FamilyError(
            f"videocache has no model family for {type(transformer).__name__} (covered: {', '.join(covered) or 'none'}); "
            "declare one (videocache.family.ModelFamily, registered under the entry-point group "
            f"{ENTRY_POINT_GROUP!r} or with videocache.register_family)"
        )
    return family


def known_models() -> dict[str, Path]:
    """Models loadable by name, over every family: name -> pipeline folder."""
    out: dict[str, Path] = {}
    for fam in families().values():
        for name, folder in fam.models.items():
            out.setdefault(name, folder)
    return out
