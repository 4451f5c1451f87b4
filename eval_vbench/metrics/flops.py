"""Measure how much transformer block work a run really executed, FLOP-weighted.

A cache's computed fraction must be measured, never derived from its configuration: diffusers hooks
replace a module's forward, so a forward pre-hook on `attn1` fires even when the hook returns a cached
value. We therefore probe the first projection *inside* each component (attention: the output
projection `to_out[0]`, which runs exactly once per executed attention whether or not q/k/v are fused;
feed-forward: its first Linear). Those only run when the component's own computation runs.

FLOPs per executed component, for a batch of B sequences of N video tokens, hidden d, text length M:
  self-attention   B * 2 * (4 N d^2 + 2 N^2 d)   (sequence-parallel over S ranks: each rank's N/S queries
                                                  attend to all N keys, 2 * (4 n d^2 + 2 n (n S) d) per rank)
  cross-attention  B * 2 * (2 N d^2 + 2 M d^2 + 2 N M d)
  feed-forward     B * 2 * (2 N d f)         (f = the feed-forward's hidden width)

HunyuanVideo (`HunyuanVideoTransformer3DModel`), with T = N + M joined tokens:
  dual attn        B * 2 * (4 T d^2 + 2 T^2 d)   probe: the video output projection `to_out[0]`
  ff, ff_context   B * 2 * (2 N d f), B * 2 * (2 M d f)   probe: their first Linear
  single attn      B * 2 * (4 T d^2 + 2 T^2 d)   (q, k, v and the attention columns of the fused proj_out)
                                                  probe: `attn.to_q`, which runs only when attention does
  single mlp       B * 2 * (2 T d f)             (proj_mlp and the MLP columns of proj_out) probe: proj_mlp

Open-Sora 1.2 (`STDiT3Model`), B samples of T frames x S tokens, spatial and temporal blocks interleaved. Each
self-attention works on groups: spatial attention on B*T frames of S tokens, temporal attention on B*S
positions of T frames; its output projection `attn.proj` sees (groups, length, d), so the probe's shape gives
the grouping and the count per group is the self-attention formula:
  spatial_attn     B*T * 2 * (4 S d^2 + 2 S^2 d)    probe: `attn.proj` of a spatial block
  temporal_attn    B*S * 2 * (4 T d^2 + 2 T^2 d)    probe: `attn.proj` of a temporal block
  cross_attn       B * 2 * (2 N d^2 + 2 M d^2 + 2 N M d), N = T*S   probe: `cross_attn.proj`
  mlp              B * 2 * (2 N d f)                                probe: `mlp.fc1`
Every attention sees whole sequences locally, so `sequence_degree` does not apply to it (keys = queries).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

COMPONENTS = ("attn1", "attn2", "ffn")  # Wan's; HunyuanVideo's are HUNYUAN_COMPONENTS
HUNYUAN_COMPONENTS = ("dual_attn", "ff", "ff_context", "single_attn", "single_mlp")
OPENSORA_COMPONENTS = ("spatial_attn", "temporal_attn", "cross_attn", "mlp")  # the adapter's component names


def self_attention_flops(n: int, d: int, keys: int | None = None) -> int:
    """n query tokens (this rank's), `keys` key tokens (all of them; default n: one process)."""
    return 2 * (4 * n * d * d + 2 * n * (n if keys is None else keys) * d)


def cross_attention_flops(n: int, m: int, d: int) -> int:
    return 2 * (2 * n * d * d + 2 * m * d * d + 2 * n * m * d)


def feed_forward_flops(n: int, d: int, f: int) -> int:
    return 2 * (2 * n * d * f)


def _first_linear(module: torch.nn.Module) -> torch.nn.Linear:
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            return sub
    raise ValueError(f"{type(module).__name__} has no Linear layer to probe")


def _last_linear(module: torch.nn.Module) -> torch.nn.Linear:
    found = [sub for sub in module.modules() if isinstance(sub, torch.nn.Linear)]
    if not found:
        raise ValueError(f"{type(module).__name__} has no Linear layer to probe")
    return found[-1]


def _attention_output_projection(attn: torch.nn.Module) -> torch.nn.Linear:
    to_out = getattr(attn, "to_out", None)
    if isinstance(to_out, torch.nn.ModuleList) and len(to_out) and isinstance(to_out[0], torch.nn.Linear):
        return to_out[0]
    if isinstance(to_out, torch.nn.Linear):
        return to_out
    raise ValueError(f"{type(attn).__name__} has no to_out projection to probe")


def transformer_blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The block list of a Wan-style transformer (blocks[i].attn1 / attn2 / ffn)."""
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"{type(transformer).__name__} has no `blocks` list; the FLOP counter supports Wan-style and "
            "HunyuanVideo transformers"
        )
    for i, block in enumerate(blocks):
        missing = [c for c in COMPONENTS if not hasattr(block, c)]
        if missing:
            raise ValueError(
                f"blocks[{i}] has no {', '.join(missing)}; the FLOP counter supports Wan-style blocks"
            )
    return blocks


@dataclass
class ComponentCounts:
    """Executed component calls and their FLOPs, keyed by component kind (attn1 / attn2 / ffn)."""

    calls: Counter = field(default_factory=Counter)
    flops: Counter = field(default_factory=Counter)
    kinds: tuple[str, ...] = COMPONENTS

    @property
    def total_flops(self) -> int:
        return int(sum(self.flops.values()))

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "calls": {k: int(self.calls[k]) for k in self.kinds},
            "flops": {k: int(self.flops[k]) for k in self.kinds},
        }


class ComponentCounter:
    """Counts executed block components of `transformer` while installed; use as a context manager.

    Installs plain torch hooks on the probe Linears (and a pre-hook on each cross-attention to learn
    the text length), so it sees exactly what ran, whichever cache library is active. Under sequence
    parallelism over `sequence_degree` ranks a rank sees its token shard; its self-attention attends to
    all the keys, so that the ranks' counts add up to the single-process FLOPs (exactly for even shards).
    """

    def __init__(self, transformer: torch.nn.Module, sequence_degree: int = 1):
        self.transformer = transformer
        self.sequence_degree = sequence_degree
        self.hunyuan = hasattr(transformer, "single_transformer_blocks")
        self.opensora = hasattr(transformer, "spatial_blocks") and hasattr(transformer, "temporal_blocks")
        self.kinds = HUNYUAN_COMPONENTS if self.hunyuan else OPENSORA_COMPONENTS if self.opensora else COMPONENTS
        self.counts = ComponentCounts(kinds=self.kinds)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._text_len: dict[int, int] = {}

    def __enter__(self) -> ComponentCounter:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def install(self) -> None:
        if self._handles:
            return
        if self.hunyuan:
            return self._install_hunyuan()
        if self.opensora:
            return self._install_opensora()
        for i, block in enumerate(transformer_blocks(self.transformer)):
            self._handles.append(
                _attention_output_projection(block.attn1).register_forward_pre_hook(self._self_attn)
            )
            self._handles.append(
                block.attn2.register_forward_pre_hook(self._remember_text(i), with_kwargs=True)
            )
            self._handles.append(
                _attention_output_projection(block.attn2).register_forward_pre_hook(self._cross_attn(i))
            )
            f = _last_linear(block.ffn).in_features
            self._handles.append(_first_linear(block.ffn).register_forward_pre_hook(self._ffn(f)))

    def _install_hunyuan(self) -> None:
        t = self.transformer
        for i, block in enumerate(t.transformer_blocks):
            self._hook(block.attn, self._remember_text(i), with_kwargs=True)
            self._hook(_attention_output_projection(block.attn), self._joint_attn("dual_attn", i, video_only=True))
            self._hook(_first_linear(block.ff), self._ffn(_last_linear(block.ff).in_features, "ff"))
            self._hook(_first_linear(block.ff_context), self._ffn(_last_linear(block.ff_context).in_features, "ff_context"))
        for j, block in enumerate(t.single_transformer_blocks):
            i = len(t.transformer_blocks) + j
            self._hook(block.attn, self._remember_text(i), with_kwargs=True)
            self._hook(block.attn.to_q, self._joint_attn("single_attn", i, video_only=False))
            self._hook(block.proj_mlp, self._ffn(block.proj_mlp.out_features, "single_mlp"))

    def _install_opensora(self) -> None:
        """STDiT3: the grouped self-attentions counted from their output projection's input (groups, length,
        d), the cross-attention like Wan's, the MLP from fc1; block index = execution order (S0, T0, S1, ...)."""
        t = self.transformer
        pairs = zip(t.spatial_blocks, t.temporal_blocks, strict=True)
        for i, block in enumerate(b for pair in pairs for b in pair):
            kind = "temporal_attn" if block.temporal else "spatial_attn"
            self._hook(block.attn.proj, self._grouped_attn(kind))
            self._hook(block.cross_attn, self._remember_text(i, "context"), with_kwargs=True)
            self._hook(block.cross_attn.proj, self._cross_attn(i, "cross_attn"))
            self._hook(block.mlp.fc1, self._ffn(block.mlp.fc1.out_features, "mlp"))

    def _hook(self, module: torch.nn.Module, hook, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> ComponentCounts:
        """Return the counts so far and start from zero."""
        counts, self.counts = self.counts, ComponentCounts(kinds=self.kinds)
        return counts

    @staticmethod
    def _shape(x: torch.Tensor) -> tuple[int, int, int]:
        """(batch, tokens, width) of a (..., tokens, width) activation."""
        n, d = int(x.shape[-2]), int(x.shape[-1])
        return max(1, x.numel() // (n * d)), n, d

    def _add(self, kind: str, flops: int) -> None:
        self.counts.calls[kind] += 1
        self.counts.flops[kind] += flops

    def _self_attn(self, module, args) -> None:
        b, n, d = self._shape(args[0])
        self._add("attn1", b * self_attention_flops(n, d, n * self.sequence_degree))

    def _grouped_attn(self, kind: str):
        """A self-attention within groups (STDiT3): the probe sees (groups, length, d), keys = length."""

        def hook(module, args) -> None:
            groups, length, d = self._shape(args[0])
            self._add(kind, groups * self_attention_flops(length, d))

        return hook

    def _remember_text(self, index: int, name: str = "encoder_hidden_states"):
        def hook(module, args, kwargs) -> None:
            text = kwargs.get(name, args[1] if len(args) > 1 else None)
            if text is not None:
                self._text_len[index] = int(text.shape[-2])

        return hook

    def _cross_attn(self, index: int, kind: str = "attn2"):
        def hook(module, args) -> None:
            b, n, d = self._shape(args[0])
            self._add(kind, b * cross_attention_flops(n, self._text_len.get(index, 0), d))

        return hook

    def _ffn(self, hidden: int, kind: str = "ffn"):
        def hook(module, args) -> None:
            b, n, d = self._shape(args[0])
            self._add(kind, b * feed_forward_flops(n, d, hidden))

        return hook

    def _joint_attn(self, kind: str, index: int, video_only: bool):
        """A joint video + text attention: the probe sees the video tokens (`video_only`) or all of them."""

        def hook(module, args) -> None:
            b, n, d = self._shape(args[0])
            text = self._text_len.get(index, 0)
            tokens = n + text if video_only else n
            # under sequence parallelism a rank's queries attend to every rank's keys
            self._add(kind, b * self_attention_flops(tokens, d, tokens * self.sequence_degree))

        return hook


def computed_fraction(method: ComponentCounts, uncached: ComponentCounts) -> float:
    """FLOP-weighted share of the uncached run's block work that the method executed."""
    if uncached.total_flops <= 0:
        raise ValueError("the uncached run executed no block components; cannot form a computed fraction")
    return method.total_flops / uncached.total_flops
