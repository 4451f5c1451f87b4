"""HunyuanVideo presets from published per-step statistics, and their computed fractions at 25/50/100 steps.

No HunyuanVideo weights are needed. The presets of `profiles/hunyuanvideo.yaml` (HunyuanVideo 13B as
diffusers' HunyuanVideoTransformer3DModel: 20 dual-stream blocks with attn / ff / ff_context, 40
single-stream blocks with attn / mlp) are chosen by our schedule search on stand-in statistics, the method
of `videocache.pipelines.stand_in_presets` (shared with the other families' `presets` modules). HunyuanVideo's
own inputs:

* MagCache's published magnitude ratios for HunyuanVideo at 720p (`MAG_RATIOS` below, from MagCache's
  HunyuanVideo sampler `magcache_sample_video.py`): 50 steps, one transformer call per step (guidance is
  distilled into an embedding, so there is no interleaved cond/uncond pair as in Wan's), flow shift 7.0.
* The sigmas: diffusers' HunyuanVideoPipeline passes linspace(1, 0, N + 1)[:-1] to
  FlowMatchEulerDiscreteScheduler with the checkpoint's shift 7.0 (used by the feb preset's stage rule).
* The skip caps 3 / 5 / 7 for slow / balanced / fast as for Wan: MagCache's HunyuanVideo settings are
  threshold 0.12 with K 4 and 0.24 with K 6 (balanced and fast: K plus one, every refresh being two
  computes); slow keeps Wan's tighter 3 (MagCache's K 2 plus one).
* Real-size FLOP shares (720p x 129 frames: latent 33 x 90 x 160, patch 2: 118,800 video tokens; 256 text
  tokens) from the adapter's `block_flops` on a meta-device model of the real config: they weigh feb's
  component-wise reuse. The aligned presets skip all components of a step alike.
* HunyuanVideo has no fused skip (each block's gates are its own linear map of temb), so the engine runs an
  aligned schedule block by block; the table is the same.

A developer tool, run from a source checkout (an editable install): it rewrites the checkout's profile and
writes its results to `benchmarks/hunyuan_presets.md` / `.json`.

    python -m videocache.pipelines.hunyuan.presets --write-profiles  # derive the presets, rewrite the profile
    python -m videocache.pipelines.hunyuan.presets                   # measure on a tiny 20 + 40-block model
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel

from ..stand_in_presets import Model, engine_fractions, main, model_report, profile_path
from .adapter import HunyuanVideoAdapter
from .tiny import tiny_hunyuan, tiny_inputs

MAGCACHE_SOURCE = (
    "MagCache (arXiv 2506.09045), github.com/Zehong-Ma/MagCache, MagCache4HunyuanVideo/magcache_sample_video.py, "
    "mag_ratios for video_size 720 (commit b4bc7a809dd9d2acc981cfd829a4f5147253fcb7)"
)
# one call per step, 50 steps; the first entry is MagCache's padding (gamma_0 = 1)
MAG_RATIOS = [1.0] + [
    1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101, 1.00679, 1.02556,
    1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886, 1.01161, 1.02968, 1.00544,
    1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588,
    1.02146, 1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703,
    0.75456,
]
FLOW_SHIFT = 7.0  # hunyuanvideo-community/HunyuanVideo's FlowMatchEulerDiscreteScheduler
# the real transformer (diffusers' HunyuanVideoTransformer3DModel defaults = the 13B checkpoint's config)
CONFIG = {"num_layers": 20, "num_single_layers": 40, "num_attention_heads": 24, "attention_head_dim": 128,
          "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1}
VIDEO_TOKENS = 33 * (90 // 2) * (160 // 2)  # 129 frames at 720p: latent 33 x 90 x 160, patch 2 -> 118,800
TEXT_TOKENS = 256  # the pipeline's max_sequence_length
PRESETS = {  # name -> (computed-fraction budget, share of the first steps always computed, most skips in a row)
    "slow": (0.6, 0.2, 3),
    "balanced": (0.5, 0.2, 5),
    "fast": (0.34, 0.1, 7),
}


def hunyuan_scheduler(steps: int) -> FlowMatchEulerDiscreteScheduler:
    """HunyuanVideoPipeline's schedule: linspace(1, 0, N + 1)[:-1] through the shift-7 flow-match scheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    return scheduler


def hunyuan_sigmas(steps: int) -> list[float]:
    """The per-step sigmas of diffusers' HunyuanVideoPipeline."""
    return [float(s) for s in hunyuan_scheduler(steps).sigmas[:steps]]


def real_transformer() -> HunyuanVideoTransformer3DModel:
    """The real config's HunyuanVideoTransformer3DModel on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return HunyuanVideoTransformer3DModel(**CONFIG)


@functools.cache
def real_flops() -> np.ndarray:
    """(60, 3) FLOPs of one real-size call per (block, cell): the adapter's `block_flops` (absent cells 0)."""
    model, adapter = real_transformer(), HunyuanVideoAdapter()
    dim = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    video, text = torch.empty(1, VIDEO_TOKENS, dim, device="meta"), torch.empty(1, TEXT_TOKENS, dim, device="meta")
    out = np.zeros((len(adapter.blocks(model)), 3))
    for b, block in enumerate(adapter.blocks(model)):
        flops = adapter.block_flops(block, (video, text, None, None, None), {})
        out[b, : len(flops)] = flops
    return out


def computed_fractions(presets, steps=(25, 50, 100)) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} of the hunyuanvideo profile, counted by the engine on a tiny
    random 20 + 40-block HunyuanVideoTransformer3DModel, one call per step, driven by the pipeline's sigmas
    (run it with one torch thread: tiny tensors run 40x faster than on two threads fighting over shared
    cores)."""
    transformer = tiny_hunyuan(dual=CONFIG["num_layers"], single=CONFIG["num_single_layers"])
    conditions = {k: v for k, v in tiny_inputs().items() if k != "hidden_states"}

    def call(x, t):
        return transformer(hidden_states=x, timestep=t.expand(1), **conditions, return_dict=False)[0]

    x0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return engine_fractions(transformer, profile_path("hunyuanvideo"), presets, steps, hunyuan_scheduler, call, x0)


HUNYUANVIDEO = Model(
    name="hunyuanvideo", title="HunyuanVideo 13B", architecture="HunyuanVideoTransformer3DModel",
    hub="hunyuanvideo-community/HunyuanVideo",
    groups=(("dual", CONFIG["num_layers"], ("attn", "ff", "ff_context")),
            ("single", CONFIG["num_single_layers"], ("attn", "mlp"))),
    ratios=tuple(MAG_RATIOS), branches=1, ratio_source=MAGCACHE_SOURCE, sigmas=hunyuan_sigmas, real_flops=real_flops,
    measure=computed_fractions, flow_shift=FLOW_SHIFT, presets=PRESETS,
    magcache=((0.12, 4), (0.24, 6)),
    skip_cap_source="R0.2; HunyuanVideo's K 4/6 plus one for balanced/fast, Wan's K 2 plus one for slow",
    blocks_text="HunyuanVideoTransformer3DModel, 20 dual-stream + 40 single-stream blocks",
    skip_text="HunyuanVideo has no fused skip: the engine skips block by block",
    feb_text="attention over 119k tokens holds most of the FLOPs",
    module="videocache.pipelines.hunyuan.presets", results="benchmarks/hunyuan_presets",
)


def report(result: dict) -> str:
    r = result["models"]["hunyuanvideo"]
    lines = [
        "# HunyuanVideo presets: computed fractions at 25 / 50 / 100 steps",
        "",
        f"`{result['command']}` (one torch thread). Counted by the engine from the modules that ran, on a tiny "
        "random HunyuanVideoTransformer3DModel with the real block counts (20 dual-stream + 40 single-stream, "
        "which match the profile's fingerprint), one call per step, driven by the pipeline's sigmas "
        "(FlowMatchEulerDiscreteScheduler, linspace(1, 0, N + 1)[:-1], shift 7.0). The same measurement is "
        "`tests/test_hunyuan_profile.py`.",
        "",
        "The presets are **not calibrated on the real weights** (see the profile's header): the fractions are "
        "exact, the quality is not measured.",
        "",
    ]
    flops = real_flops()
    shares = {"dual attn": flops[:20, 0].sum(), "dual ff": flops[:20, 1].sum(), "dual ff_context": flops[:20, 2].sum(),
              "single attn": flops[20:, 0].sum(), "single mlp": flops[20:, 1].sum()}
    total = sum(shares.values())
    note = ("Last column: the FLOP-weighted fraction the expanded table predicts with one real-size call's FLOPs "
            "per component (720p x 129 frames: 118,800 video tokens, 256 text tokens; the adapter's block_flops "
            "on a meta-device model of the real config; shares of one call: "
            + ", ".join(f"{k} {v / total:.3f}" for k, v in shares.items())
            + f"; {total / 1e15:.1f} PFLOP per call). slow / balanced / fast skip every component of a step "
            "together, so their fraction is the same at any size; feb reuses single components and saves less "
            "at the real size than on the tiny model; its interval of 2 stays 2 at every step count. "
            "With shift 7.0 the late stage (sigma < 0.4) is only the last few steps, so feb mostly reuses the "
            "feed-forward parts every other step.")
    return "\n".join(lines + model_report(HUNYUANVIDEO, r, note))


if __name__ == "__main__":
    main([HUNYUANVIDEO], report, __doc__)
