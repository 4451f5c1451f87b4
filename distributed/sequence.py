"""Ulysses sequence parallelism from a plan's `sequence` part, on diffusers' context-parallel machinery.

What is diffusers' (0.42.1): the plan format and Wan's plan (`_cp_plan`), `ContextParallelConfig` and its
mesh set-up, the sharders (`EquipartitionSharder` for even splits, `PartitionAnythingSharder` for
uneven ones), the split / gather logic (`ContextParallelSplitHook`, `ContextParallelGatherHook`), and the
attention itself (`dispatch_attention_fn` with a parallel config: all-to-all over heads, and its
"anything" variant for uneven token and head counts).

What is ours, and why:

* `enable_parallelism` is not called: it computes `rank % torch.accelerator.device_count()`, a
  ZeroDivisionError on a machine without an accelerator. We build the mesh (`cfg x ring x ulysses`, so
  that CFG parallelism shares it) and call `ParallelConfig.setup` ourselves, and give every attention
  processor the config, which is all `enable_parallelism` does for context parallelism.
* diffusers attaches its split/gather hooks through its hook registry, where the hook registered last
  runs first: a cache applied afterwards (videocache's block hooks, diffusers' own caches) would see the
  full sequence, which is why diffusers wants the cache enabled first. We run the same hook objects from
  torch's module hooks instead, which run before and after any registry hook, so the cache sees token
  shards whichever was applied first.
* even or uneven: per call, the token count decides whether the even path (one all-to-all, no size
  exchange) or diffusers' "anything" path (sizes exchanged, uneven splits, padded heads) runs; the final
  gather of uneven shards is ours (`gather_uneven`), since diffusers' gives gloo tensors of different
  shapes to all_gather.
* key masks (a plan's `key_masks`, e.g. HunyuanVideo's mask of padded prompt tokens): diffusers'
  plan format cannot express them. The model builds one mask over all keys in its own layout (the
  token groups concatenated: all video, then all text); after the split a rank's keys are its shard of
  each group, so every module that takes the mask gets it reordered for the ranks (`ranks_key_order`,
  no communication): rank 0's shard of every group, then rank 1's, .... That is the layout of the keys
  after Ulysses' all-to-all (diffusers then uses the mask as it is, instead of all-gathering a local
  one), and ring attention's key/value block j is the j-th equal slice of it (see `ring`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from diffusers.hooks.context_parallel import (
    ContextParallelGatherHook,
    ContextParallelSplitHook,
    _get_submodule_by_name,
)
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from videocache.parallel_plan import ParallelPlan

from .checks import ParallelConfigError


class _SplitHook(ContextParallelSplitHook):
    """diffusers' split hook, silent where an input does not have the dimensions the plan expects: Wan's
    plan splits Wan2.2's per-token timestep (2-D) and leaves Wan2.1's (1-D) alone, which diffusers logs as
    a warning on every run."""

    def _prepare_cp_input(self, x: torch.Tensor, cp_input: ContextParallelInput) -> torch.Tensor:
        if cp_input.expected_dims is not None and x.dim() != cp_input.expected_dims:
            return x
        return super()._prepare_cp_input(x, cp_input)


def gather_uneven(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    """All ranks' shards of different sizes along `dim`, concatenated in rank order. diffusers' own
    (`_all_gather_anything`) hands all_gather tensors of different shapes, which gloo refuses: pad every
    shard to the largest, gather, and cut the padding off."""
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import gather_size_by_comm

    x = x.contiguous()
    sizes = gather_size_by_comm(x.shape[dim], group)
    largest = max(sizes)
    if x.shape[dim] < largest:
        pad = list(x.shape)
        pad[dim] = largest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes, strict=True)], dim=dim)


class _GatherHook(ContextParallelGatherHook):
    """diffusers' gather hook, with `gather_uneven` for shards of different sizes."""

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        cp = self.parallel_config
        if not (cp.ulysses_anything or cp.ring_anything):
            return super().post_forward(module, output)
        single = isinstance(output, torch.Tensor)
        outputs = [output] if single else list(output)
        group = cp._flattened_mesh.get_group()
        for i, cpm in enumerate(self.metadata):
            if cpm is not None:
                outputs[i] = gather_uneven(outputs[i], cpm.gather_dim, group)
        return outputs[0] if single else tuple(outputs)


def _split_inputs(hook: _SplitHook, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return hook.pre_forward(module, *args, **kwargs)


def _after(hook: Any, module: torch.nn.Module, args: tuple, output: Any) -> Any:
    return hook.post_forward(module, output)


def _splits_output(entry: Any) -> bool:
    return isinstance(entry, ContextParallelInput) and entry.split_output


def ranks_key_order(mask: torch.Tensor, segments: tuple[int, ...], degree: int) -> torch.Tensor:
    """A key mask `[..., sum(segments)]` in the model's layout (the token groups concatenated) reordered
    into the ranks' layout: for rank 0, 1, ..., that rank's shard of every group, in group order. Shards
    are those of diffusers' sharders (`tensor_split`, which is `chunk` for even sizes)."""
    parts, start = [], 0
    for n in segments:
        parts.append(mask.narrow(-1, start, n).tensor_split(degree, dim=-1))
        start += n
    return torch.cat([group[r] for r in range(degree) for group in parts], dim=-1)


class _KeyMasks:
    """The reordered key mask of the current top-level call, made once and handed to every module that
    takes the mask (the model passes one tensor to all of them)."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.segments: tuple[int, ...] | None = None
        self.source: torch.Tensor | None = None
        self.result: torch.Tensor | None = None

    def start_call(self, segments: tuple[int, ...]) -> None:
        self.segments, self.source, self.result = segments, None, None

    def reorder(self, mask: Any) -> Any:
        if not isinstance(mask, torch.Tensor) or self.segments is None:
            return mask
        if mask is not self.source:
            if mask.shape[-1] != sum(self.segments):
                raise ValueError(
                    f"the key mask has {mask.shape[-1]} keys but the plan's token groups {self.segments} add up to "
                    f"{sum(self.segments)}: the model's parallel plan does not match this call"
                )
            self.source, self.result = mask, ranks_key_order(mask, self.segments, self.degree)
        return self.result


def _reorder_mask(masks: _KeyMasks, name: str, index: int | None, module: torch.nn.Module, args: tuple, kwargs: dict):
    if name in kwargs:
        return args, {**kwargs, name: masks.reorder(kwargs[name])}
    if index is not None and index < len(args):
        return (*args[:index], masks.reorder(args[index]), *args[index + 1 :]), kwargs
    return None


def _input_index(module: torch.nn.Module, name: str) -> int | None:
    """The position of input `name` in the module's forward (None when it can only come by keyword); read
    from the class, since a hook registry may have wrapped the instance's forward."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self
    for i, param in enumerate(params):
        if param.name == name:
            return i if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) else None
    raise ValueError(f"{type(module).__name__}.forward has no input {name!r} (the parallel plan's key_masks)")


def attach_sequence_plan(
    transformer: torch.nn.Module, plan: ParallelPlan, parallel_config: Any
) -> list[torch.utils.hooks.RemovableHandle]:
    """Attach the plan's splits and gathers as torch module hooks; returns their handles.

    A root pre-hook, first of all, picks the even or the uneven path for the call from its token counts
    (and starts the call's key-mask reordering when the plan has key masks)."""
    cp = parallel_config.context_parallel_config
    degree = cp.ulysses_degree * cp.ring_degree
    heads_uneven = plan.attention_heads % cp.ulysses_degree != 0
    masks = _KeyMasks(degree) if plan.key_masks else None
    handles = []

    def choose_path(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        segments = plan.segments(module, args, kwargs)
        for name, n in segments.items():
            if n < degree:
                raise ParallelConfigError(
                    f"{n} {name} tokens cannot be split over {degree} sequence-parallel ranks: use a degree <= {n}"
                )
        uneven = any(n % degree for n in segments.values())
        counts = " and ".join(f"{n} {name}" for name, n in segments.items())
        if cp.ring_degree > 1 and cp.ulysses_degree > 1:
            if uneven or heads_uneven:  # diffusers' USP has no uneven variant
                raise ParallelConfigError(
                    f"Ulysses x ring needs the {counts} tokens divisible by {degree} and the heads by "
                    f"{cp.ulysses_degree}: use Ulysses or ring alone for this size"
                )
        elif cp.ring_degree > 1:
            if uneven and masks is not None:  # diffusers' ring-anything attention refuses a mask
                raise ParallelConfigError(
                    f"ring attention over token counts that {degree} does not divide ({counts}) takes no key mask, "
                    f"and this model's attention has one: use --ulysses, or a size whose token counts divide by {degree}"
                )
            cp.ring_anything = uneven
        else:
            cp.ulysses_anything = heads_uneven or uneven
        if masks is not None:
            masks.start_call(tuple(segments.values()))

    handles.append(transformer.register_forward_pre_hook(choose_path, with_kwargs=True, prepend=True))
    for module_id, name in plan.key_masks.items():
        found = _get_submodule_by_name(transformer, module_id)
        for module in found if isinstance(found, list) else [found]:
            hook = functools.partial(_reorder_mask, masks, name, _input_index(module, name))
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    for module_id, entry in plan.sequence.items():
        found = _get_submodule_by_name(transformer, module_id)
        for module in found if isinstance(found, list) else [found]:
            if isinstance(entry, dict):
                hook = _SplitHook(entry, cp)
                hook.initialize_hook(module)
                values = list(entry.values())
                if not all(_splits_output(v) for v in values):
                    handles.append(
                        module.register_forward_pre_hook(functools.partial(_split_inputs, hook), with_kwargs=True)
                    )
                if any(_splits_output(v) for v in values):
                    handles.append(module.register_forward_hook(functools.partial(_after, hook)))
            else:
                outputs = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
                hook = _GatherHook(outputs, cp)
                handles.append(module.register_forward_hook(functools.partial(_after, hook)))
    return handles


def attention_processors(transformer: torch.nn.Module) -> list[Any]:
    """The attention processors that take a parallel config (what `enable_parallelism` configures)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    classes = (Attention, MochiAttention, AttentionModuleMixin)
    out = []
    for module in transformer.modules():
        if isinstance(module, classes):
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                out.append(processor)
    return out


def check_attention_backend(processors: list[Any], *, ring: bool = False, device: torch.device | None = None) -> None:
    """The processors' attention backend must implement context parallelism (as `enable_parallelism` checks),
    and for ring attention return the log-sum-exp (the native one does on the CPU only, see `ring`)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for processor in processors[:1]:
        backend = getattr(processor, "_attention_backend", None)
        backend = _AttentionBackendRegistry.get_active_backend()[0] if backend is None else AttentionBackendName(backend)
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            ok = ", ".join(sorted(_AttentionBackendRegistry._supports_context_parallel))
            raise ParallelConfigError(
                f"attention backend {backend.value!r} has no sequence-parallel implementation in diffusers; use one of {ok}"
            )
        if ring and backend == AttentionBackendName.NATIVE and device is not None and device.type != "cpu":
            raise ParallelConfigError(
                "ring attention needs the attention's log-sum-exp, which the native backend gives only on the CPU: "
                "use --attention-backend flash or _native_cudnn"
            )
