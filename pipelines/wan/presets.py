"""Wan2.1 T2V presets from published per-step statistics, and their computed fractions at 25/50/100 steps.

No Wan2.1 weights are needed. The presets of `profiles/wan2.1-t2v-1.3b.yaml` and `profiles/wan2.1-t2v-14b.yaml`
are chosen by our schedule search on stand-in statistics (`videocache.pipelines.stand_in_presets` has the
method, shared with the other families' `presets` modules). Wan's own inputs:

* MagCache's published magnitude ratios for Wan2.1 T2V 1.3B and 14B (`MAG_RATIOS` below, copied from
  MagCache's `magcache_generate.py`; calibrated by the MagCache authors with Wan's own sampler: UniPC, 50
  steps, shift 5.0, both CFG branches, interleaved).
* The skip caps: MagCache's K of its Wan settings E012K2R02 / E012K4R02 / E024K6R02 plus one (3 / 5 / 7 for
  slow / balanced / fast), because here every refresh is two computes.
* The engine runs these aligned schedules as a fused skip of the whole block stack; the calibrated
  reference-wan presets came out aligned at all three budgets.

A developer tool, run from a source checkout (an editable install): it rewrites the checkout's profiles and
writes its results to `benchmarks/wan_presets.md` / `.json`.

    python -m videocache.pipelines.wan.presets --write-profiles  # derive the presets, rewrite both profiles
    python -m videocache.pipelines.wan.presets                   # measure fractions on tiny 30/40-block Wans
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler

from videocache import COMPONENTS

from ..reference.build import tiny_wan_transformer
from ..stand_in_presets import Model, engine_fractions, main, model_report, profile_path

MAGCACHE_SOURCE = (
    "MagCache (arXiv 2506.09045), github.com/Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py, "
    "mag_ratios for 'T2V-1.3B' / 'T2V-14B' (commit df81cb181776c2c61477c08e1d21f87fda1cd938 and later)"
)
# interleaved [cond, uncond] per step, 50 steps; the first pair is MagCache's padding (gamma_0 = 1)
MAG_RATIOS = {
    "wan2.1-t2v-1.3b": [1.0] * 2 + [
        1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634, 0.99685, 0.99567, 0.99586,
        0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511, 0.99506, 0.99535, 0.99531, 0.99552, 0.99549,
        0.99541, 0.99539, 0.9954, 0.99536, 0.99489, 0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479,
        0.99415, 0.99413, 0.99419, 0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304,
        0.9927, 0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005, 0.99003,
        0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504, 0.98503, 0.9836, 0.98359,
        0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741, 0.97411, 0.97003, 0.97002, 0.96538, 0.96541,
        0.9593, 0.95933, 0.95086, 0.95089, 0.94013, 0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868,
        0.81838, 0.81939,
    ],
    "wan2.1-t2v-14b": [1.0] * 2 + [
        1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966, 0.99658, 0.99482, 0.99476,
        0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533, 0.99545, 0.99468, 0.99465, 0.99438, 0.99434,
        0.99516, 0.99517, 0.99384, 0.9938, 0.99404, 0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426,
        0.99347, 0.99343, 0.99418, 0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215,
        0.99216, 0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887, 0.98866,
        0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838, 0.98376, 0.98177, 0.98173,
        0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184, 0.97183, 0.96711, 0.96708, 0.96349, 0.96345,
        0.95629, 0.95625, 0.94926, 0.94929, 0.93964, 0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945,
        0.86111, 0.86189,
    ],
}
# (video tokens, hidden size, FFN size) at the real sizes: 81 frames at 480p (1.3B) / 720p (14B), 512 T5 tokens
REAL_SIZE = {"wan2.1-t2v-1.3b": (32760, 1536, 8960), "wan2.1-t2v-14b": (75600, 5120, 13824)}
PRESETS = {  # name -> (computed-fraction budget, share of the first steps always computed, most skips in a row)
    "slow": (0.6, 0.2, 3),
    "balanced": (0.5, 0.2, 5),
    "fast": (0.34, 0.1, 7),
}


def wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """Wan's diffusers scheduler: UniPC on flow sigmas."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


def wan_sigmas(steps: int, flow_shift: float) -> list[float]:
    scheduler = wan_scheduler(flow_shift)
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas[:steps]]


def real_flops(name: str, blocks: int) -> np.ndarray:
    """FLOPs of one real-size call per (block, component): the Wan adapter's formulas."""
    n, d, ffn = REAL_SIZE[name]
    m = 512
    per = [8 * n * d * d + 4 * n * n * d, 4 * n * d * d + 4 * m * d * d + 4 * n * m * d, 4 * n * d * ffn]
    return np.tile(np.asarray(per, dtype=np.float64), (blocks, 1))


def computed_fractions(name: str, blocks: int, flow_shift: float, presets,
                       steps=(25, 50, 100)) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} of profile `name`, counted by the engine on a tiny random
    WanTransformer3DModel with the real block count, driven by Wan's scheduler with the released
    checkpoint's flow_shift (run it with one torch thread: tiny tensors run 40x faster than on two threads
    fighting over shared cores)."""
    transformer, scheduler = tiny_wan_transformer(blocks), wan_scheduler(flow_shift)
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 4, 16, generator=g)

    def scheduler_for(n: int) -> UniPCMultistepScheduler:
        scheduler.set_timesteps(n)
        return scheduler

    def call(x, t):
        return transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]

    return engine_fractions(transformer, profile_path(name), presets, steps, scheduler_for, call, x0)


def wan(name: str, title: str, blocks: int, shift: float, hub: str) -> Model:
    return Model(
        name=name, title=title, architecture="WanTransformer3DModel", hub=hub,
        groups=(("blocks", blocks, tuple(COMPONENTS)),), ratios=tuple(MAG_RATIOS[name]), branches=2,
        ratio_source=MAGCACHE_SOURCE, sigmas=partial(wan_sigmas, flow_shift=shift),
        real_flops=partial(real_flops, name, blocks), measure=partial(computed_fractions, name, blocks, shift),
        flow_shift=shift, presets=PRESETS, magcache=((0.12, 2), (0.24, 6)), skip_cap_source="R0.2; K 2/4/6, here plus one",
        blocks_text=f"WanTransformer3DModel, {blocks} blocks", skip_text="the engine skips the whole block stack on a skipped step",
        feb_text="self-attention holds most of the FLOPs", module="videocache.pipelines.wan.presets",
        results="benchmarks/wan_presets",
    )


# profile -> blocks, diffusers flow_shift of the released Diffusers checkpoint, title
MODELS = {
    "wan2.1-t2v-1.3b": wan("wan2.1-t2v-1.3b", "Wan2.1 T2V 1.3B", 30, 3.0, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    "wan2.1-t2v-14b": wan("wan2.1-t2v-14b", "Wan2.1 T2V 14B", 40, 5.0, "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
}


def report(result: dict) -> str:
    lines = [
        "# Wan2.1 T2V presets: computed fractions at 25 / 50 / 100 steps",
        "",
        f"`{result['command']}` (one torch thread). Counted by the engine from the modules that ran, on tiny "
        "random WanTransformer3DModels with the real block counts (30 for 1.3B, 40 for 14B, which match the "
        "profiles' fingerprints), driven by Wan's diffusers scheduler (UniPCMultistepScheduler, flow sigmas, "
        "flow_shift of the released Diffusers checkpoint). The same measurement is `tests/test_wan_presets.py`.",
        "",
        "The presets are **not calibrated on the real weights** (see the profiles' headers): the fractions are "
        "exact, the quality is not measured.",
        "",
    ]
    note = ("Last column: the FLOP-weighted fraction the expanded table predicts with one real-size call's "
            "FLOPs per component (81 frames, 480p for 1.3B, 720p for 14B; self-attention holds most of them). "
            "slow / balanced / fast skip every component of a step together, so their fraction is the same "
            "at any size; feb reuses single components and saves less at the real size than on the tiny "
            "model; its interval of 2 stays 2 at every step count.")
    for name, r in result["models"].items():
        lines += model_report(MODELS[name], r, note)
    return "\n".join(lines)


if __name__ == "__main__":
    main(list(MODELS.values()), report, __doc__)
