"""`parallelize(pipe, ulysses=N, cfg=2)`: sequence and CFG parallelism on a pipeline's transformer (on each of
its experts where it has several, Wan2.2 A14B's two).

The process world is laid out as a `cfg x ring x ulysses` device mesh: the ring x ulysses ranks of one
CFG branch share its tokens, the two branches run on the two halves of the world. Every rank loads the
whole model and runs the pipeline with the same seed; the transformer's hooks make each rank compute its
branch on its token shard, and every rank ends each step with the full predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from videocache.family import family_of
from videocache.parallel_plan import AGREE_ATTR, ParallelPlan

from .cfg import CFG_HOOK, CfgParallelHook
from .checks import ParallelConfigError, ParallelSettings, check_settings
from .dsp import attach_axes_plan
from .sequence import attach_sequence_plan, attention_processors, check_attention_backend

_ATTR = "_videocache_parallel"
_MESHES: dict[tuple[str, int, int], Any] = {}
_DECISION_GROUPS: dict[tuple[int, int], Any] = {}


class Agreement:
    """One decision taken together by the ranks that share a branch's tokens: True only where every rank
    says True (an all_reduce MIN of one int over a gloo group, so a CPU value: no device synchronisation).
    The cache engine asks it whenever its byte budget decides something, because token shards of uneven
    size make the ranks' byte counts differ; a cell computed on one rank and reused on another would
    leave the first waiting in the attention collective."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.calls = 0

    def __call__(self, flag: bool) -> bool:
        self.calls += 1
        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value[0])


def _decision_group(settings: ParallelSettings, rank: int) -> Any:
    """The gloo group of this rank's ring x ulysses ranks (made for every branch on every rank, once)."""
    size = settings.ring * settings.ulysses
    key = (settings.cfg, size)
    if key not in _DECISION_GROUPS:
        groups = [dist.new_group(list(range(c * size, (c + 1) * size)), backend="gloo") for c in range(settings.cfg)]
        _DECISION_GROUPS[key] = groups
    return _DECISION_GROUPS[key][rank // size]


def _mesh(device_type: str, settings: ParallelSettings) -> Any:
    """The (cfg, ring, ulysses) device mesh, made once per layout (making one is a collective)."""
    key = (device_type, settings.cfg, settings.ring, settings.ulysses)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[key] = init_device_mesh(
            device_type, (settings.cfg, settings.ring, settings.ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
        )
    return _MESHES[key]


def _diffusers_config(mesh: Any, settings: ParallelSettings, device: torch.device) -> Any:
    """diffusers' ParallelConfig for the ring x ulysses part of the mesh, set up the way
    `ModelMixin._resolve_parallel_config` does, minus its device lookup (see `sequence`)."""
    from diffusers.models._modeling_parallel import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig

    config = DiffusersParallelConfig(
        context_parallel_config=ContextParallelConfig(ulysses_degree=settings.ulysses, ring_degree=settings.ring)
    )
    config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=mesh)
    return config


@dataclass
class Parallelism:
    """What `parallelize` attached; `remove()` takes it all off again."""

    transformer: torch.nn.Module
    settings: ParallelSettings
    plan: ParallelPlan
    rank: int
    cfg_rank: int  # this rank's CFG branch (0: cond, 1: uncond); 0 without CFG parallelism
    ulysses_rank: int  # this rank's place in its Ulysses group
    ring_rank: int = 0  # this rank's place in its ring
    parallel_config: Any = None  # diffusers' ParallelConfig (None without sequence parallelism)
    cfg_hook: CfgParallelHook | None = None
    handles: list[Any] = field(default_factory=list)
    processors: list[Any] = field(default_factory=list)
    experts: list[Parallelism] = field(default_factory=list)  # the pipeline's other experts', removed with this

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.settings.world_size,
            "ulysses": self.settings.ulysses,
            "ring": self.settings.ring,
            "cfg": self.settings.cfg,
            "rank": self.rank,
            "cfg_rank": self.cfg_rank,
            "ulysses_rank": self.ulysses_rank,
            "ring_rank": self.ring_rank,
            "dsp": self.plan.axes is not None and self.settings.sequence_degree > 1,  # Ulysses ranks do DSP
        }

    def remove(self) -> None:
        for other in self.experts:
            other.remove()
        self.experts.clear()
        if getattr(self.transformer, AGREE_ATTR, None) is not None:
            delattr(self.transformer, AGREE_ATTR)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for processor in self.processors:
            processor._parallel_config = None
        self.processors.clear()
        if self.parallel_config is not None and getattr(self.transformer, "_parallel_config", None) is self.parallel_config:
            self.transformer._parallel_config = None
        if self.cfg_hook is not None:
            from videocache.hooks import drop_empty_registry

            registry = self.transformer._diffusers_hook
            registry.remove_hook(CFG_HOOK, recurse=False)
            drop_empty_registry(self.transformer)
            self.cfg_hook = None
        if getattr(self.transformer, _ATTR, None) is self:
            delattr(self.transformer, _ATTR)


def get_parallel_plan(transformer: torch.nn.Module) -> ParallelPlan:
    """The plan the transformer's model family declares (a one-line FamilyError when it has no family or
    no plan)."""
    plan = family_of(transformer).require("parallel_plan", "sequence and CFG parallelism")(transformer)
    if not isinstance(plan, ParallelPlan):
        raise TypeError(f"the parallel plan of {type(transformer).__name__} is a {type(plan).__name__}, not a ParallelPlan")
    return plan


def parallelize(pipe_or_transformer: Any, *, ulysses: int = 1, ring: int = 1, cfg: int = 1) -> Parallelism:
    """Spread a pipeline's transformer (or a transformer) over the processes of the initialised default
    process group: `ring x ulysses` ranks per branch share the tokens (Ulysses all-to-all, ring attention,
    or both), `cfg=2` puts the two guidance branches on the two halves of the world; `cfg * ring *
    ulysses` must be the world size. Every rank must call it, with the same model on its own device. Apply
    a videocache cache before it when using `cfg=2` (either order works for sequence parallelism alone).
    A plan with an `axes` part (Open-Sora) shares the tokens by two-axis sequence parallelism (`dsp`) over
    `ulysses` ranks instead.
    A pipeline with several transformers (experts) gets each parallelised alike; the first expert's
    Parallelism is returned and removes them all.
    Raises ParallelConfigError (one line) for an impossible configuration."""
    if getattr(pipe_or_transformer, "transformer", None) is None:
        transformers = [pipe_or_transformer]
    else:
        from videocache.experts import pipeline_denoisers

        transformers = [getattr(pipe_or_transformer, d.attribute) for d in pipeline_denoisers(pipe_or_transformer)]
    first = _parallelize(transformers[0], ulysses, ring, cfg)
    try:
        for transformer in transformers[1:]:
            first.experts.append(_parallelize(transformer, ulysses, ring, cfg))
    except Exception:
        first.remove()
        raise
    return first


def _parallelize(transformer: torch.nn.Module, ulysses: int, ring: int, cfg: int) -> Parallelism:
    transformer = getattr(transformer, "_orig_mod", transformer)
    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelConfigError(
            "torch.distributed is not initialised: launch with `accelerate launch --multi_gpu --num_processes N "
            "--num_machines 1 ...` and call videocache.distributed.process_state() first"
        )
    if getattr(transformer, _ATTR, None) is not None:
        raise RuntimeError("this transformer is already parallelised; call .remove() on its Parallelism first")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise RuntimeError("diffusers parallelism is already enabled on this transformer")
    settings = ParallelSettings(ulysses=ulysses, cfg=cfg, ring=ring)
    plan = get_parallel_plan(transformer)
    if plan.axes is not None and ring > 1:
        raise ParallelConfigError(
            f"{type(transformer).__name__} is split along its two token axes (DSP), which has no ring variant: "
            f"give the sequence-parallel degree as --ulysses {ring * ulysses}"
        )
    check_settings(settings, dist.get_world_size(), heads=None if plan.axes is not None else plan.attention_heads)
    rank = dist.get_rank()
    device = next(transformer.parameters()).device
    sequence = settings.sequence_degree > 1
    axes = sequence and plan.axes is not None
    processors = attention_processors(transformer) if sequence and not axes else []
    if sequence:
        check_attention_backend(processors, ring=ring > 1, device=device)
    if ring > 1 and plan.key_masks and device.type != "cpu":
        raise ParallelConfigError(
            f"ring attention with an attention key mask ({type(transformer).__name__} masks padded prompt tokens) "
            "is implemented for the CPU only: use --ulysses"
        )
    if ring > 1:
        from .ring import install_cpu_lse

        install_cpu_lse()
    mesh = _mesh(device.type, settings)
    par = Parallelism(
        transformer, settings, plan, rank, cfg_rank=mesh.get_local_rank("cfg"),
        ulysses_rank=mesh.get_local_rank("ulysses"), ring_rank=mesh.get_local_rank("ring"),
    )
    try:
        if axes:
            group = mesh.get_group("ulysses")
            par.handles = attach_axes_plan(transformer, plan.axes, group, settings.ulysses, par.ulysses_rank)
            setattr(transformer, AGREE_ATTR, Agreement(_decision_group(settings, rank)))
        elif sequence:
            par.parallel_config = _diffusers_config(mesh, settings, device)
            for processor in processors:
                processor._parallel_config = par.parallel_config
            par.processors = processors
            transformer._parallel_config = par.parallel_config
            par.handles = attach_sequence_plan(transformer, plan, par.parallel_config)
            setattr(transformer, AGREE_ATTR, Agreement(_decision_group(settings, rank)))
        if cfg == 2:
            from diffusers.hooks import HookRegistry

            par.cfg_hook = CfgParallelHook(plan, mesh.get_group("cfg"), par.cfg_rank)
            registry = HookRegistry.check_if_exists_or_initialize(transformer)
            registry.register_hook(par.cfg_hook, CFG_HOOK)
            registry.invalidate_child_registries_cache()
    except Exception:
        par.remove()
        raise
    setattr(transformer, _ATTR, par)
    return par


def get_parallelism(pipe_or_transformer: Any) -> Parallelism | None:
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    return getattr(transformer, _ATTR, None)
