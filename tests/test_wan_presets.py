"""The Wan2.1 T2V profiles' presets save what they promise, counted from the modules that ran.

Tiny random WanTransformer3DModels with the real block counts (30 for 1.3B, 40 for 14B) match the
profiles' fingerprints; the denoising calls run with Wan's diffusers scheduler (UniPC, flow sigmas, the
released checkpoints' flow_shift), so each preset expands on Wan's own sigmas at 25, 50 and 100 steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler

import videocache as vc
from videocache.pipelines.reference.build import tiny_wan_transformer

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
MODELS = {"wan2.1-t2v-1.3b": (30, 3.0), "wan2.1-t2v-14b": (40, 5.0)}  # blocks, flow_shift (480p / 720p)
STEPS = (25, 50, 100)
# the most each preset may compute: the targets at 50 steps, a little slack at 25 and 100
LIMITS = {"slow": {25: 0.65, 50: 0.61, 100: 0.65}, "balanced": {25: 0.55, 50: 0.5, 100: 0.55},
          "fast": {25: 0.4, 50: 0.35, 100: 0.4}}


def wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is 40x faster than two fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def engine_fractions(transformer, profile, presets, steps, scheduler_for, call, x0) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} counted by the engine over a denoising loop from `x0` per step
    count: `scheduler_for(n)` gives the scheduler set for n steps, `call(x, t)` the transformer's output
    (run under the "cond" context)."""
    out: dict[str, dict[int, float]] = {}
    for preset in presets:
        for n in steps:
            scheduler = scheduler_for(n)
            engine = vc.apply_to_transformer(transformer, scheduler, profile, preset, trace=False, num_inference_steps=n)
            x = x0
            try:
                with torch.no_grad():
                    for t in scheduler.timesteps:
                        with transformer.cache_context("cond"):
                            v = call(x, t)
                        x = scheduler.step(v, t, x).prev_sample
                assert engine.stats()["calls"]["transformer"] == n
                out.setdefault(preset, {})[n] = engine.stats()["computed_fraction"]
            finally:
                vc.remove(transformer)
    return out


def computed_fractions(model: str, presets, steps=STEPS) -> dict[str, dict[int, float]]:
    """{preset: {steps: computed fraction}} measured by the engine on a tiny random model of `model`'s size
    (run it with one torch thread: see `one_thread`)."""
    blocks, shift = MODELS[model]
    transformer, scheduler = tiny_wan_transformer(blocks), wan_scheduler(shift)
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 4, 16, generator=g)

    def scheduler_for(n: int) -> UniPCMultistepScheduler:
        scheduler.set_timesteps(n)
        return scheduler

    def call(x, t):
        return transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]

    return engine_fractions(transformer, PROFILES / f"{model}.yaml", presets, steps, scheduler_for, call, x0)


@pytest.mark.parametrize("model", MODELS)
def test_presets_meet_their_compute_budgets(model, one_thread):
    fractions = computed_fractions(model, LIMITS)
    print(f"\n{model} computed fraction at {'/'.join(map(str, STEPS))} steps:")
    for preset, by_steps in fractions.items():
        print(f"  {preset:9s} " + "  ".join(f"{by_steps[n]:.3f}" for n in STEPS))
    for preset, limits in LIMITS.items():
        for n, limit in limits.items():
            got = fractions[preset][n]
            assert got <= limit + 1e-9, (preset, n, got)
            assert got >= limit - 0.1, (preset, n, got)  # saves what it should, not more than that
        assert max(fractions[preset].values()) - min(fractions[preset].values()) <= 0.04, preset


@pytest.mark.parametrize("model", MODELS)
def test_profiles_say_they_are_not_calibrated(model):
    text = (PROFILES / f"{model}.yaml").read_text()
    assert "NOT CALIBRATED" in text.splitlines()[1]
    profile = vc.load_profile(PROFILES / f"{model}.yaml")
    assert profile.calibrated is False and profile.metadata["calibrated_on_real_weights"] is False
    assert profile.default_preset == "slow"
    assert set(profile.presets) == {"slow", "balanced", "fast", "feb", "full"}
    assert f"videocache profile --model Wan-AI/{'Wan2.1-T2V-1.3B' if '1.3b' in model else 'Wan2.1-T2V-14B'}" in (
        profile.metadata["calibrate_with_weights"]
    )
    assert "MagCache" in profile.metadata["source"] and "FEB-Cache" in profile.metadata["source"]
