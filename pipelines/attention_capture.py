"""Foreground/background profiling of a transformer from its own attention: captures what `videocache.fgbg`
scores. Which modules are the self-attentions and how their queries and keys are formed is the model
family's `attention_probe` (`pipelines/<family>/probes.py`); everything here is generic.

* `SelfAttentionCapture`: a forward pre-hook on every block's self-attention instance that, while armed,
  recomputes the block's query and key exactly as the model's attention processor does (the probe's
  `query_key`) on a subset of heads and records the attention every video token receives from the video
  queries, chunk by chunk over queries. In a joint attention (video and text) the softmax spans the text
  keys too (padded ones masked, as the model does), but text tokens are left out of the column means and
  the masks. The attention output itself is untouched. A chunk's float32 logits (batch x heads x chunk x
  tokens) are held about three times over at once (logits, scaled, softmax), so the chunk shrinks to keep
  them within `max_chunk_bytes` (1 GiB): at Wan2.1-1.3B's 480p x 81 frames (32,760 tokens, 12 heads) 682
  queries instead of 1,024, about 3 GiB at the peak instead of 4.8 GB. Attention within groups of tokens
  (a probe with `to_tokens`, e.g. Open-Sora's spatial and temporal attention) is scored per group and put
  back in token order by the probe.
* `score_call`: the foreground mask of one call, cut from the output (by default from the clean latent
  it implies, x0 = x_t - sigma v) at latent resolution and pooled to the token grid, and R_attn per block.
* `profile_pipeline`: runs a pipeline on prompts and scores the chosen steps of the conditional pass,
  giving an `FgBgProfile` (per-block R_attn, classes, heatmap data).

Profiling runs in one process on the whole token sequence (no sequence parallelism): the column means need
every query, and a profile is made once per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from tqdm.auto import tqdm

from videocache.family import family_of
from videocache.fgbg import (
    FgBgProfile,
    ScoreAccumulator,
    attention_received,
    block_scores,
    foreground_mask,
    pool_mask,
)
from videocache.hooks import drop_empty_registry

PROBE_HOOK = "videocache_fgbg_probe"
MAX_CHUNK_BYTES = 2**30  # float32 logits of one query chunk (see SelfAttentionCapture)
SIGNALS = ("velocity", "x0")


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


def attention_probe(transformer: torch.nn.Module) -> AttentionProbe:
    """The probe the transformer's model family declares (a one-line FamilyError when it has none)."""
    return family_of(transformer).require("attention_probe", "foreground/background profiling (videocache profile)")(
        transformer)


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
    call_of: Callable[[str], dict[str, Any]] | None = None,
    **call_kwargs: Any,
) -> FgBgProfile:
    """Generate every (prompt, seed) with `pipe` (its transformer's family declares an attention probe;
    `call_kwargs` go to its call, e.g.
    num_inference_steps, num_frames, height, width, guidance_scale, and `call_of(prompt)` adds a prompt's own,
    such as an image-to-video model's first frame) and score the conditional pass at
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
                    **(call_of(prompt) if call_of is not None else {}),
                )
    finally:
        registry.remove_hook(PROBE_HOOK, recurse=False)
        drop_empty_registry(transformer)
    return run.scores.result(tau=tau, heads=run.capture.heads)
