"""Open-Sora 1.2 presets from published per-step statistics, and their computed fractions at 15/30/60 steps.

No Open-Sora weights are needed. The presets of `profiles/opensora-1.2.yaml` (Open-Sora 1.2 as our
`STDiT3Model`, STDiT3-XL/2: 28 spatial blocks with spatial_attn / cross_attn / mlp and 28 temporal blocks
with temporal_attn / cross_attn / mlp, run interleaved S0, T0, S1, ... as the adapter's two block groups)
are chosen by our schedule search on stand-in statistics, the method of
`videocache.pipelines.stand_in_presets` (shared with the other families' `presets` modules). Open-Sora's own
inputs (/work/shared/OPENSORA.md, sections 1.8 and 4.2):

* MagCache's calibrated magnitude ratios for Open-Sora 1.2 (`MAGCACHE_RATIOS` below, from MagCache's
  `eval/magcache/experiments/opensora.py`): 29 values for 30 steps, whose square root the code uses. One
  transformer call per step there (VideoSys batches the two CFG branches into one call), so one ratio per
  step; the first step's is MagCache's padding (1). Its rule: the first 6 steps computed (retention 0.2),
  then skip while the accumulated error stays <= 0.12 and at most K = 3 steps in a row.
* The sigmas: the rectified-flow schedule of the benchmark setting (480p "9:16" = 480 x 854 pixels, 51
  frames): 1 - i / N shifted by the size/length ratio 4.843, through FlowMatchEulerDiscreteScheduler as
  `OpenSoraPipeline` sets it (`set_opensora_timesteps`).
* The budgets, against the published Open-Sora numbers: slow 0.7 of the block work (between PAB, about
  1.3-1.4x, and TeaCache-slow, about 1.55x), balanced 0.5, fast 0.4 (MagCache's own rule computes 0.40 on
  these ratios, 12 of 30 steps; TeaCache-fast is about 2.25x). The skip caps 2 / 4 / 4: MagCache's K 3 for
  Open-Sora plus one for balanced and fast (every refresh being two computes), one less for slow.
* Real-size FLOP shares (480p x 51 frames: latent 4 x 15 x 60 x 106, patch 1 x 2 x 2: 15 frames of 30 x 53 =
  1,590 positions, 23,850 tokens; 300 caption tokens) from the adapter's `block_flops` on a meta-device
  `STDiT3Model` of the released config: they weigh feb's component-wise reuse.
* Open-Sora has the fused skip (the adapter splits the gates into per-block and shared parts), so the engine
  skips the whole block stack on a skipped step of these aligned presets.

A developer tool, run from a source checkout (an editable install): it rewrites the checkout's profile and
writes its results to `benchmarks/opensora_presets.md` / `.json`.

    python -m videocache.pipelines.opensora.presets --write-profiles  # derive the presets, rewrite the profile
    python -m videocache.pipelines.opensora.presets                   # measure on a tiny 28 + 28-block model
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..stand_in_presets import Model, engine_fractions, main, model_report, profile_path
from .adapter import OpenSoraAdapter
from .model import STDiT3Model
from .model.schedule import default_scheduler, set_opensora_timesteps, shift_ratio
from .model.tiny import tiny_inputs, tiny_transformer

MAGCACHE_SOURCE = (
    "MagCache (arXiv 2506.09045), github.com/Zehong-Ma/MagCache, eval/magcache/experiments/opensora.py, "
    "the Open-Sora 1.2 mag_ratios (29 values, square root taken as the code does; /work/shared/OPENSORA.md 4.2)"
)
# as published: the code compares with their square roots; one per step from the second of 30
MAGCACHE_RATIOS = [
    0.93359, 0.96484, 0.99609, 1.0, 0.99609, 0.99609, 0.99219, 1.0, 1.0, 0.99609, 0.99219, 1.0, 0.99219, 0.99609,
    0.99219, 0.99609, 0.99609, 0.99609, 0.99219, 0.99219, 0.99219, 0.98828, 0.98828, 0.98438, 0.98438, 0.97656,
    0.97656, 0.96484, 0.96484,
]
MAG_RATIOS = [1.0] + [math.sqrt(r) for r in MAGCACHE_RATIOS]  # the first entry: MagCache's padding
STEPS = 30  # Open-Sora 1.2's sampler (RFLOW, 30 steps)
HEIGHT, WIDTH, FRAMES = 480, 854, 51  # the cache papers' benchmark setting (480p "9:16", 2 s)
LATENT = (4, 15, 60, 106)  # channels, frames, height, width of that setting's latent
TEXT_TOKENS = 300  # T5 padding length (the cross-attention is computed over all of them)
PRESETS = {  # name -> (computed-fraction budget, share of the first steps always computed, most skips in a row)
    "slow": (0.7, 0.2, 2),
    "balanced": (0.5, 0.2, 4),
    "fast": (0.4, 0.1, 4),
}


def flow_shift() -> float:
    """The size/length shift of the benchmark setting (float math, as the official sampler in float32)."""
    return shift_ratio(HEIGHT, WIDTH, FRAMES)


def opensora_scheduler(steps: int):
    """A FlowMatchEulerDiscreteScheduler set as OpenSoraPipeline sets it for the benchmark setting."""
    scheduler = default_scheduler()
    set_opensora_timesteps(scheduler, steps, HEIGHT, WIDTH, FRAMES)
    return scheduler


def opensora_sigmas(steps: int) -> list[float]:
    return [float(s) for s in opensora_scheduler(steps).sigmas[:steps]]


def real_transformer() -> STDiT3Model:
    """The released STDiT3-XL/2 (`STDiT3Model` defaults) on the meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        return STDiT3Model()


@functools.cache
def real_flops() -> np.ndarray:
    """(56, 3) FLOPs of one real-size call (one CFG branch) per (block, cell) in execution order: the
    adapter's `block_flops`."""
    model, adapter = real_transformer(), OpenSoraAdapter()
    _, frames, height, width = LATENT
    tokens = frames * (height // 2) * (width // 2)
    dim = model.config.hidden_size
    hidden = torch.empty(1, tokens, dim, device="meta")
    context = torch.empty(1, TEXT_TOKENS, dim, device="meta")
    blocks = adapter.blocks(model)
    out = np.zeros((len(blocks), 3))
    for b, block in enumerate(blocks):
        out[b] = adapter.block_flops(block, (hidden, context, None, None, frames, None), {})
    return out


def _real_groups() -> tuple:
    """The adapter's fingerprint groups of the released config: (name, blocks, components, block indices)."""
    return tuple((g["name"], g["num_blocks"], tuple(g["components"]), tuple(g["blocks"]))
                 for g in OpenSoraAdapter().fingerprint(real_transformer())["groups"])


def computed_fractions(presets, steps=(15, 30, 60)) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} of the opensora-1.2 profile, counted by the engine on a tiny
    random 28 + 28-block STDiT3Model, one call per step, driven by the pipeline's schedule (run it with one
    torch thread: tiny tensors run 40x faster than on two threads fighting over shared cores)."""
    transformer = tiny_transformer(depth=28)
    conditions = {k: v for k, v in tiny_inputs().items() if k != "hidden_states"}

    def call(x, t):  # the sampler's velocity is the first 4 channels, x0 - noise: the scheduler takes its negative
        out = transformer(hidden_states=x, timestep=t.expand(1), **conditions, return_dict=False)[0]
        return -out[:, : x.shape[1]]

    x0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return engine_fractions(transformer, profile_path("opensora-1.2"), presets, steps, opensora_scheduler, call, x0)


OPENSORA = Model(
    name="opensora-1.2", title="Open-Sora 1.2", architecture="STDiT3Model", hub="OPENSORA_FOLDER",
    groups=_real_groups(), ratios=tuple(MAG_RATIOS), branches=1, ratio_source=MAGCACHE_SOURCE,
    sigmas=opensora_sigmas, real_flops=real_flops, measure=computed_fractions,
    flow_shift=round(flow_shift(), 4), presets=PRESETS, magcache=((0.12, 3),),
    skip_cap_source="R0.2; Open-Sora's K 3 plus one for balanced/fast, one less for slow",
    blocks_text="STDiT3Model, STDiT3-XL/2: 28 spatial + 28 temporal blocks",
    skip_text="Open-Sora has the fused skip: the engine skips the whole block stack on a skipped step",
    feb_text="the MLPs hold half of the FLOPs, self-attention a third",
    module="videocache.pipelines.opensora.presets", results="benchmarks/opensora_presets", steps=STEPS,
    groups_text=("The blocks run interleaved (S0, T0, S1, ...): the groups spatial (the even blocks) and temporal "
                 "(the odd ones) list their block indices, as the Open-Sora adapter's fingerprint does."),
    calibrate_args=f"--frames {FRAMES} --height {HEIGHT} --width {WIDTH}",
    hub_text=("OPENSORA_FOLDER: a folder laid out like the official hub repos, with model_index.json "
              "and transformer/ (hpcai-tech/OpenSora-STDiT-v3), vae/ (hpcai-tech/OpenSora-VAE-v1.2), text_encoder/ "
              "(DeepFloyd/t5-v1_1-xxl); see pipelines/opensora/README.md"),
)


def report(result: dict) -> str:
    r = result["models"][OPENSORA.name]
    lines = [
        "# Open-Sora 1.2 presets: computed fractions at 15 / 30 / 60 steps",
        "",
        f"`{result['command']}` (one torch thread). Counted by the engine from the modules that ran, on a tiny "
        "random STDiT3Model with the real block counts (28 spatial + 28 temporal, interleaved, which match the "
        "profile's fingerprint), one call per step, driven by the pipeline's schedule (FlowMatchEulerDiscreteScheduler, "
        f"1 - i / N shifted by {r['flow_shift']}, the ratio of 480 x 854 pixels and 51 frames). The same "
        "measurement is `tests/test_opensora_profile.py`.",
        "",
        "The presets are **not calibrated on the real weights** (see the profile's header): the fractions are "
        "exact, the quality is not measured.",
        "",
    ]
    flops = real_flops()
    spatial, temporal = flops[0::2], flops[1::2]
    shares = {"spatial_attn": spatial[:, 0].sum(), "temporal_attn": temporal[:, 0].sum(),
              "cross_attn": spatial[:, 1].sum() + temporal[:, 1].sum(), "mlp": spatial[:, 2].sum() + temporal[:, 2].sum()}
    total = sum(shares.values())
    note = ("Last column: the FLOP-weighted fraction the expanded table predicts with one real-size call's FLOPs "
            "per component (480p x 51 frames: 23,850 tokens, 15 frames of 1,590 positions, 300 caption tokens; the "
            "adapter's block_flops on a meta-device STDiT3Model of the released config; shares of one call: "
            + ", ".join(f"{k} {v / total:.3f}" for k, v in shares.items())
            + f"; {total / 1e12:.1f} TFLOP per call and CFG branch). slow / balanced / fast skip every component "
            "of a step together, so their fraction is the same at any size; feb reuses single components, so "
            "its fraction depends on these shares.")
    return "\n".join(lines + model_report(OPENSORA, r, note))


if __name__ == "__main__":
    main([OPENSORA], report, __doc__)
