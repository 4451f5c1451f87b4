"""Foreground/background profiling of Wan2.1, HunyuanVideo and Open-Sora 1.2 transformers: captures what
`videocache.fgbg` scores.

* `SelfAttentionCapture`: a forward pre-hook on every block's self-attention instance (Wan: `attn1`;
  HunyuanVideo: the joint video + text `attn` of the dual- and single-stream blocks) that, while armed,
  recomputes the block's query and key exactly as the model's attention processor does (projections, q/k
  norms, rotary embedding on the video tokens) on a subset of heads and records the attention every video
  token receives from the video queries, chunk by chunk over queries. In a joint attention the softmax
  spans the text keys too (padded ones masked, as the model does), but text tokens are left out of the
  column means and the masks. The attention output itself is untouched. A chunk's float32 logits
  (batch x heads x chunk x tokens) are held about three times over at once (logits, scaled, softmax), so
  the chunk shrinks to keep them within `max_chunk_bytes` (1 GiB): at Wan2.1-1.3B's 480p x 81 frames
  (32,760 tokens, 12 heads) 682 queries instead of 1,024, about 3 GiB at the peak instead of 4.8 GB.
  Open-Sora 1.2 (STDiT3): both self-attentions, in execution order (spatial 0, temporal 0, spatial 1, ...:
  the adapter's block indices). They attend within groups, the S tokens of a frame (spatial) or the T
  frames of a position (temporal, with RoPE), so a token receives attention from its own group only:
  each group's column means sum to 1 over its L members (L = S or T). To make spatial and temporal
  scores comparable they are scaled by L (1 = the uniform share; above 1, more than uniform). R_attn
  thresholds each frame's tokens against their own mean and spread, so the scaling does not change it;
  in a temporal block a token's score says how much the frames at its position look at its frame.
* `score_call`: the foreground mask of one call, cut from the output (by default from the clean latent
  it implies, x0 = x_t - sigma v) at latent resolution and pooled to the token grid, and R_attn per block.
* `profile_pipeline`: runs a WanPipeline on prompts and scores the chosen steps of the conditional pass,
  giving an `FgBgProfile` (per-block R_attn, classes, heatmap data).

Profiling runs in one process on the whole token sequence (no sequence parallelism): the column means need
every query, and a profile is made once per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.embeddings import apply_rotary_emb
from tqdm.auto import tqdm

from videocache.engine import drop_empty_registry
from videocache.fgbg import (
    FgBgProfile,
    ScoreAccumulator,
    attention_received,
    block_scores,
    foreground_mask,
    pool_mask,
)

PROBE_HOOK = "videocache_fgbg_probe"
MAX_CHUNK_BYTES = 2**30  # float32 logits of one query chunk (see WanSelfAttentionCapture)
SIGNALS = ("velocity", "x0")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]) as a complex multiply by cos + i sin; cos/sin
    hold each pair's angle twice (Wan's repeat-interleaved tables)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


def wan_query_key(
    attn: torch.nn.Module, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of Wan's self-attention `attn` for this input, (B, N, heads, head_dim) each, as
    WanAttnProcessor forms them before the attention kernel."""
    if getattr(attn, "fused_projections", False):
        q, k, _ = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k = attn.to_q(hidden_states), attn.to_k(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
    return q, k


def hunyuan_query_key(attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      rotary_emb: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Video queries and all keys (video, then text), (B, N, heads, head_dim), of a HunyuanVideo joint
    attention as HunyuanVideoAttnProcessor2_0 forms them: the dual-stream blocks project text with the
    `add_*` projections, the single-stream blocks project the joined tokens with one; RoPE on the video."""
    video = hidden_states.shape[1]
    if attn.add_q_proj is None:
        joined = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q = attn.norm_q(attn.to_q(joined).unflatten(2, (attn.heads, -1)))[:, :video]
        k = attn.norm_k(attn.to_k(joined).unflatten(2, (attn.heads, -1)))
        k_video, k_text = k[:, :video], k[:, video:]
    else:
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)))
        k_video = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)))
        k_text = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)))
    if rotary_emb is not None:
        q = apply_rotary_emb(q, rotary_emb, sequence_dim=1)
        k_video = apply_rotary_emb(k_video, rotary_emb, sequence_dim=1)
    return q, torch.cat([k_video, k_text], dim=1)


def opensora_query_key(attn: torch.nn.Module, hidden_states: torch.Tensor, num_frames: int,
                       rope_angles: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key of an STDiT3 self-attention (`SelfAttention`) for its input (B, T*S, C), as it forms
    them before the attention kernel: per group (G, L, heads, head_dim) with the groups the frames
    ((B*T), S) of a spatial block or the positions ((B*S), T) of a temporal one; fused qkv, per-head
    RMSNorm, then RoPE (interleaved pairs) in temporal blocks."""
    from .opensora.transformer import apply_rope_interleaved

    batch, tokens, channels = hidden_states.shape
    x = hidden_states.view(batch, num_frames, tokens // num_frames, channels)
    if attn.temporal:
        x = x.transpose(1, 2)
    groups, length = x.shape[0] * x.shape[1], x.shape[2]
    qkv = attn.qkv(x.reshape(groups, length, channels)).view(groups, length, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.unbind(2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.temporal and rope_angles is not None:
        q = apply_rope_interleaved(q.transpose(1, 2), rope_angles).transpose(1, 2)
        k = apply_rope_interleaved(k.transpose(1, 2), rope_angles).transpose(1, 2)
    return q, k


@dataclass(frozen=True)
class AttentionProbe:
    """Where one architecture's self-attention is and how to recompute its inputs: the attention modules
    in block order, `query_key(module, args, kwargs) -> (q, k, key_mask, video_tokens)` with q over the
    video queries and k over every key (B, N, heads, head_dim), and the (t, h, w) patch size.

    Attention within groups of tokens (Open-Sora): q and k are (G, L, heads, head_dim) per group and
    `to_tokens(received (G, L), module, args, kwargs) -> (B, N)` puts the groups' scores back in token
    order. `velocity(output) -> v` turns a transformer output into the flow velocity noise - x0 that
    `score_call` expects, where the model predicts something else (Open-Sora: x0 - noise, with extra
    channels)."""

    modules: list[torch.nn.Module]
    query_key: Any
    patch_size: tuple[int, int, int]
    to_tokens: Any = None
    velocity: Any = None

    @property
    def num_heads(self) -> int:
        module = self.modules[0]
        return int(getattr(module, "heads", None) or module.num_heads)


def _wan_qk(module, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    q, k = wan_query_key(module, hidden, args[3] if len(args) > 3 else kwargs.get("rotary_emb"))
    return q, k, None, hidden.shape[1]


def _hunyuan_qk(module, args, kwargs):
    bound = dict(zip(("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb"), args,
                     strict=False)) | kwargs
    hidden, mask = bound["hidden_states"], bound.get("attention_mask")
    q, k = hunyuan_query_key(module, hidden, bound["encoder_hidden_states"], bound.get("image_rotary_emb"))
    key_mask = None if mask is None else mask.reshape(mask.shape[0], 1, -1)  # (B, 1 head, keys)
    return q, k, key_mask, hidden.shape[1]


def _opensora_bind(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    bound = dict(zip(("x", "num_frames", "rope_angles"), args, strict=False)) | kwargs
    return bound["x"], int(bound["num_frames"]), bound.get("rope_angles")


def _opensora_qk(module, args, kwargs):
    hidden, frames, rope = _opensora_bind(args, kwargs)
    q, k = opensora_query_key(module, hidden, frames, rope)
    return q, k, None, None


def _opensora_tokens(received: torch.Tensor, module, args, kwargs) -> torch.Tensor:
    """(G, L) group scores -> (B, T*S) in token order t*S + s, times L (1 = uniform; see the module doc)."""
    hidden, frames, _ = _opensora_bind(args, kwargs)
    batch, tokens = hidden.shape[:2]
    scaled = received * received.shape[-1]
    if module.temporal:  # groups (b, s), members t
        return scaled.view(batch, tokens // frames, frames).transpose(1, 2).reshape(batch, tokens)
    return scaled.reshape(batch, tokens)  # groups (b, t), members s


def attention_probe(transformer: torch.nn.Module) -> AttentionProbe:
    """The probe for a Wan, HunyuanVideo or Open-Sora 1.2 transformer (ValueError, one line, for others)."""
    config = transformer.config
    if hasattr(transformer, "temporal_blocks") and hasattr(transformer, "spatial_blocks"):
        channels = int(config.in_channels)
        return AttentionProbe([b.attn for b in transformer.blocks()], _opensora_qk, tuple(config.patch_size),
                              _opensora_tokens, lambda out: -out[:, :channels])
    if hasattr(transformer, "single_transformer_blocks"):
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        patch = (int(config.patch_size_t), int(config.patch_size), int(config.patch_size))
        return AttentionProbe([b.attn for b in blocks], _hunyuan_qk, patch)
    if hasattr(transformer, "blocks") and hasattr(transformer.blocks[0], "attn1"):
        return AttentionProbe([b.attn1 for b in transformer.blocks], _wan_qk, tuple(config.patch_size))
    raise ValueError(
        f"foreground/background profiling supports Wan, HunyuanVideo and Open-Sora 1.2; not {type(transformer).__name__}"
    )


class SelfAttentionCapture:
    """While `armed`, records per block the attention each video token receives (mean over `heads`, or all
    heads), as (B, N_video) float32 in `received`. Use as a context manager; hooks sit on the self-attention
    instances only (`attention_probe`)."""

    def __init__(
        self, transformer: torch.nn.Module, heads: Sequence[int] | None = None, chunk: int = 1024,
        max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
    ) -> None:
        self.probe = attention_probe(transformer)
        num_heads = self.probe.num_heads
        if heads is not None:
            heads = sorted({int(h) for h in heads})
            if not heads or heads[0] < 0 or heads[-1] >= num_heads:
                raise ValueError(f"heads must be indices in 0-{num_heads - 1}; got {heads}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1; got {chunk!r}")
        if max_chunk_bytes is not None and (isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int)
                                            or max_chunk_bytes < 1):
            raise ValueError(f"max_chunk_bytes must be an integer >= 1 or None; got {max_chunk_bytes!r}")
        self.transformer = transformer
        self.heads = heads
        self.chunk = chunk
        self.max_chunk_bytes = max_chunk_bytes
        self.armed = False
        self.received: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> SelfAttentionCapture:
        for b, module in enumerate(self.probe.modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(b), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.armed = False

    def _hook(self, block: int):
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.armed:
                return
            with torch.no_grad():
                q, k, key_mask, video = self.probe.query_key(module, args, kwargs)
                if self.heads is not None:
                    q, k = q[:, :, self.heads], k[:, :, self.heads]
                a = attention_received(q.transpose(1, 2), k.transpose(1, 2), chunk=self.chunk_for(k.shape),
                                       key_mask=key_mask, keep=video).mean(dim=1)
                if self.probe.to_tokens is not None:
                    a = self.probe.to_tokens(a, module, args, kwargs)
            self.received[block] = a

        return pre

    def chunk_for(self, shape: Sequence[int]) -> int:
        """Queries per chunk for keys of `shape` (B, N, heads, head_dim): `chunk`, or fewer where one chunk's
        float32 logits (B x heads x chunk x N) would exceed `max_chunk_bytes`."""
        batch, tokens, heads = int(shape[0]), int(shape[1]), int(shape[2])
        if self.max_chunk_bytes is None:
            return self.chunk
        return max(1, min(self.chunk, self.max_chunk_bytes // (4 * batch * heads * tokens)))

    def take(self) -> dict[int, torch.Tensor]:
        out, self.received = self.received, {}
        return out


def mask_signal(output: torch.Tensor, x_t: torch.Tensor, sigma: float | None, signal: str) -> torch.Tensor:
    """What the foreground mask is cut from: the velocity itself, or the clean latent it implies
    (x0 = x_t - sigma * v for x_t = (1 - sigma) x0 + sigma eps)."""
    if signal == "velocity":
        return output
    if signal == "x0":
        if sigma is None:
            raise ValueError("signal 'x0' needs the call's sigma (the pipeline's cache_context gives it)")
        return x_t.float() - sigma * output.float()
    raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")


def score_call(
    received: dict[int, torch.Tensor],
    output: torch.Tensor,
    x_t: torch.Tensor,
    sigma: float | None,
    patch_size: Sequence[int],
    signal: str = "x0",
    border: int = 1,
    token_threshold: float = 0.5,
) -> tuple[torch.Tensor, list[dict[int, float | None]]]:
    """Token-grid foreground masks (B, F', H', W') from one call's output (B, C, F, H, W), cut at latent
    resolution and pooled to patches (a token is foreground when `token_threshold` of its positions are),
    and each sample's per-block R_attn. `border` latent positions at the frame edge are background (the Wan
    VAE's zero padding distorts them)."""
    latents = mask_signal(output, x_t, sigma, signal).permute(0, 2, 3, 4, 1)  # (B, F, H, W, C)
    masks = torch.stack(
        [pool_mask(foreground_mask(f, border=border), patch_size, token_threshold) for f in latents]
    )
    scores = [block_scores({blk: a[i] for blk, a in received.items()}, masks[i]) for i in range(len(masks))]
    return masks, scores


# -- profiling a pipeline's own generations -----------------------------------------------------------
class _ProbeState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _ContextProbe(ModelHook):
    """Receives the pipeline's `cache_context` (name, step) and scores the chosen conditional calls."""

    _is_stateful = True

    def __init__(self, run: _ProfileRun) -> None:
        super().__init__()
        self.run = run
        self.state_manager = StateManager(_ProbeState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # the scores accumulate over generations; nothing per generation to reset

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.state_manager._context
        step, sigma = self.run.locate(ctx)
        if ctx is None or ctx.name != "cond" or step not in self.run.steps:
            return self.fn_ref.original_forward(*args, **kwargs)
        capture = self.run.capture
        capture.armed = True
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            capture.armed = False
        sample = out[0] if isinstance(out, tuple) else out.sample
        if capture.probe.velocity is not None:
            sample = capture.probe.velocity(sample)
        x_t = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        run = self.run
        _, scores = score_call(
            capture.take(),
            sample,
            x_t,
            sigma,
            run.patch_size,
            run.signal,
            run.border,
            run.token_threshold,
        )
        for s in scores:
            run.scores.add(step, s)
        return out


@dataclass
class _ProfileRun:
    capture: SelfAttentionCapture
    scores: ScoreAccumulator
    steps: tuple[int, ...]
    patch_size: tuple[int, int, int]
    signal: str
    border: int
    token_threshold: float
    scheduler: Any = None

    def locate(self, ctx: Any) -> tuple[int | None, float | None]:
        """(step, sigma) of a call: from the cache context (WanPipeline passes them), else from the
        scheduler's step counter (HunyuanVideoPipeline names the context only)."""
        if ctx is not None and ctx.step_index is not None:
            return ctx.step_index, ctx.sigma
        index = getattr(self.scheduler, "step_index", None)
        step = 0 if index is None else int(index)
        sigmas = getattr(self.scheduler, "sigmas", None)
        return step, None if sigmas is None or step >= len(sigmas) else float(sigmas[step])


def default_profile_steps(num_steps: int) -> list[int]:
    """Every few steps from 60 % of the schedule on. Earlier the subject is not yet resolved and the mask
    cut from the prediction is poor: on the reference pipeline (25 steps) its IoU against true masks was
    0.35 at step 10, 0.42 at 13, 0.49 at 16, 0.54 at 19, 0.58 at 22."""
    return list(range(round(0.6 * num_steps), num_steps, max(1, num_steps // 8)))


def profile_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    steps: Sequence[int],
    *,
    seeds: Sequence[int] = (0,),
    heads: Sequence[int] | None = None,
    chunk: int = 1024,
    max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
    signal: str = "x0",
    border: int = 1,
    token_threshold: float = 0.5,
    tau: float | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> FgBgProfile:
    """Generate every (prompt, seed) with `pipe` (a Wan, HunyuanVideo or Open-Sora pipeline; `call_kwargs` go to its call, e.g.
    num_inference_steps, num_frames, height, width, guidance_scale) and score the conditional pass at
    `steps`. The mask comes from the model's output (`signal`: the velocity or the clean latent it implies,
    with `border` edge positions left out; see `score_call`)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
    transformer = pipe.transformer
    capture = SelfAttentionCapture(transformer, heads, chunk, max_chunk_bytes)
    run = _ProfileRun(
        capture=capture,
        scores=ScoreAccumulator(len(capture.probe.modules), tuple(steps)),
        steps=tuple(steps),
        patch_size=capture.probe.patch_size,
        signal=signal,
        border=border,
        token_threshold=token_threshold,
        scheduler=pipe.scheduler,
    )
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(_ContextProbe(run), PROBE_HOOK)
    registry.invalidate_child_registries_cache()
    pipe.set_progress_bar_config(disable=True)  # one bar over the runs instead of one per run
    try:
        with run.capture, torch.no_grad():
            runs = [(prompt, seed) for prompt in prompts for seed in seeds]
            for prompt, seed in tqdm(runs, desc="fg/bg profile", disable=not progress, dynamic_ncols=True):
                pipe(
                    prompt=prompt,
                    generator=torch.Generator().manual_seed(int(seed)),
                    output_type="latent",
                    **call_kwargs,
                )
    finally:
        registry.remove_hook(PROBE_HOOK, recurse=False)
        drop_empty_registry(transformer)
    return run.scores.result(tau=tau, heads=run.capture.heads)
