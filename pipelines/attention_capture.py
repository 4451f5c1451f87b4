"""Foreground/background profiling of Wan2.1 transformers: captures what `videocache.fgbg` scores.

* `WanSelfAttentionCapture`: a forward pre-hook on every block's `attn1` instance that, while armed,
  recomputes the block's query and key exactly as `WanAttnProcessor` does (projection, RMS norm across
  heads, rotary embedding) on a subset of heads and records the attention every video token receives,
  chunk by chunk over queries. The attention output itself is untouched. A chunk's float32 logits
  (batch x heads x chunk x tokens) are held about three times over at once (logits, scaled, softmax), so
  the chunk shrinks to keep them within `max_chunk_bytes` (1 GiB): at Wan2.1-1.3B's 480p x 81 frames
  (32,760 tokens, 12 heads) 682 queries instead of 1,024, about 3 GiB at the peak instead of 4.8 GB.
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


class WanSelfAttentionCapture:
    """While `armed`, records per block the attention each token receives (mean over `heads`, or all heads),
    as (B, N) float32 in `received`. Use as a context manager; hooks sit on the attn1 instances only."""

    def __init__(
        self, transformer: torch.nn.Module, heads: Sequence[int] | None = None, chunk: int = 1024,
        max_chunk_bytes: int | None = MAX_CHUNK_BYTES,
    ) -> None:
        num_heads = transformer.blocks[0].attn1.heads
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

    def __enter__(self) -> WanSelfAttentionCapture:
        for b, block in enumerate(self.transformer.blocks):
            self._handles.append(block.attn1.register_forward_pre_hook(self._hook(b), with_kwargs=True))
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
            hidden = args[0] if args else kwargs["hidden_states"]
            rotary = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
            with torch.no_grad():
                q, k = wan_query_key(module, hidden, rotary)
                if self.heads is not None:
                    q, k = q[:, :, self.heads], k[:, :, self.heads]
                a = attention_received(q.transpose(1, 2), k.transpose(1, 2), chunk=self.chunk_for(q.shape))
            self.received[block] = a.mean(dim=1)

        return pre

    def chunk_for(self, shape: Sequence[int]) -> int:
        """Queries per chunk for q of `shape` (B, N, heads, head_dim): `chunk`, or fewer where one chunk's
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
        step = None if ctx is None else ctx.step_index
        if ctx is None or ctx.name != "cond" or step not in self.run.steps:
            return self.fn_ref.original_forward(*args, **kwargs)
        capture = self.run.capture
        capture.armed = True
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            capture.armed = False
        sample = out[0] if isinstance(out, tuple) else out.sample
        x_t = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        run = self.run
        _, scores = score_call(
            capture.take(),
            sample,
            x_t,
            ctx.sigma,
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
    capture: WanSelfAttentionCapture
    scores: ScoreAccumulator
    steps: tuple[int, ...]
    patch_size: tuple[int, int, int]
    signal: str
    border: int
    token_threshold: float


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
    """Generate every (prompt, seed) with `pipe` (a WanPipeline; `call_kwargs` go to its call, e.g.
    num_inference_steps, num_frames, height, width, guidance_scale) and score the conditional pass at
    `steps`. The mask comes from the model's output (`signal`: the velocity or the clean latent it implies,
    with `border` edge positions left out; see `score_call`)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
    transformer = pipe.transformer
    run = _ProfileRun(
        capture=WanSelfAttentionCapture(transformer, heads, chunk, max_chunk_bytes),
        scores=ScoreAccumulator(len(transformer.blocks), tuple(steps)),
        steps=tuple(steps),
        patch_size=tuple(transformer.config.patch_size),
        signal=signal,
        border=border,
        token_threshold=token_threshold,
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
