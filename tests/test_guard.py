"""The run-time guard on a cache table (videocache.guard) and presets calibrated at several guidance scales."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import videocache as vc
from videocache import Action, CacheTable, GuardConfig
from videocache.guard import TableGuard
from videocache.pipelines.reference.build import tiny_wan_transformer

from .test_parallel import _spawn

STEPS = 10
NEVER = GuardConfig((1.0, 0.0), (1.0, 1.0), threshold=1e9)  # measures, never forces
ALWAYS = GuardConfig((1.0, 0.0), (1e-6, 1e-6), threshold=0.01)  # expects no drift: forces wherever it may


def _table() -> CacheTable:
    """Whole-step computes and forecasts; steps 1-3 and 6-8 compute between two computed steps."""
    actions = np.zeros((STEPS, 4, 3), dtype=np.int8)
    actions[[4, 5, 9]] = int(Action.FORECAST)
    return CacheTable(actions)


def _scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    return scheduler


@torch.no_grad()
def _denoise(model, scheduler) -> list[torch.Tensor]:
    """Euler steps with CFG as two cache contexts, as WanPipeline calls the transformer."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8)
    text = torch.randn(1, 6, 16)
    sigmas = [float(s) for s in scheduler.sigmas]
    outs = []
    for i, t in enumerate(scheduler.timesteps):
        v = []
        for context in ("cond", "uncond"):
            with model.cache_context(context, step_index=i, num_inference_steps=STEPS, sigma=sigmas[i]):
                v.append(model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0])
        guided = v[1] + 3.0 * (v[0] - v[1])
        outs.append(guided)
        x = x + (sigmas[i + 1] - sigmas[i]) * guided
    return outs


def test_a_guard_that_never_fires_changes_nothing_and_remove_restores_the_model():
    model, scheduler = tiny_wan_transformer(4), _scheduler()
    uncached = _denoise(model, scheduler)
    vc.apply_to_transformer(model, scheduler, _table(), fuse_skipped_steps=False)
    alone = _denoise(model, scheduler)
    vc.remove(model)
    engine = vc.apply_to_transformer(model, scheduler, _table(), guard=NEVER)
    guarded = _denoise(model, scheduler)
    stats = engine.stats()
    vc.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(alone, guarded, strict=True))
    assert stats["guard_forced"] == [] and len(stats["guard_signal"]) == STEPS - 1
    assert all(torch.equal(a, b) for a, b in zip(uncached, _denoise(model, scheduler), strict=True))


def test_forced_steps_are_paid_back_and_the_computed_fraction_holds():
    model, scheduler = tiny_wan_transformer(4), _scheduler()
    uncached = _denoise(model, scheduler)
    alone_engine = vc.apply_to_transformer(model, scheduler, _table())
    alone = _denoise(model, scheduler)
    alone_fraction = alone_engine.stats()["computed_fraction"]
    vc.remove(model)
    engine = vc.apply_to_transformer(model, scheduler, _table(), guard=ALWAYS)
    guarded = _denoise(model, scheduler)
    stats = engine.stats()
    vc.remove(model)
    assert stats["guard_forced"] and len(stats["guard_forced"]) == len(stats["guard_dropped"])
    assert stats["fallbacks"] == 0
    assert stats["computed_fraction"] == pytest.approx(alone_fraction, abs=1e-9)
    # every drop is a step computed between two computed steps, never the last one
    assert all(0 < u < STEPS - 1 for u in stats["guard_dropped"])
    assert not torch.equal(alone[-1], guarded[-1])
    assert all(torch.isfinite(o).all() for o in guarded)
    assert all(torch.equal(a, b) for a, b in zip(uncached, _denoise(model, scheduler), strict=True))


def test_the_guard_reads_the_device_once_per_step(monkeypatch):
    """One transfer of the two sums per step (the first context of the step decides), none in the other
    contexts' calls."""
    model, scheduler = tiny_wan_transformer(4), _scheduler()
    transfers = []
    original = torch.Tensor.to

    def counted(self, *args, **kwargs):
        caller = os.path.basename(__import__("sys")._getframe(1).f_code.co_filename)
        if caller == "guard.py":
            transfers.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted)
    vc.apply_to_transformer(model, scheduler, _table(), guard=NEVER)
    _denoise(model, scheduler)
    vc.remove(model)
    assert len(transfers) == STEPS - 1  # step 0 has no previous input


def _profile_dict() -> dict:
    return {"schema_version": 1, "name": "tiny", "model": {"architecture": "WanTransformer3DModel", "num_blocks": 4},
            "steps": STEPS, "guidance_scale": 5.0,
            "presets": {"p": {"explicit_forecast": {"mlp": {"all": [4, 5, 9]}}},
                        "q": {"explicit": {"mlp": {"all": [3]}}}},
            "variants": [{"guidance_scale": 8.0, "presets": {"p": {"explicit_forecast": {"mlp": {"all": [7]}}}}}],
            "guard": NEVER.to_dict()}


def test_guard_and_variants_survive_a_round_trip_and_pick_by_guidance():
    profile = vc.Profile.from_dict(_profile_dict())
    again = vc.Profile.from_dict(__import__("yaml").safe_load(profile.to_yaml()))
    assert again.to_dict() == profile.to_dict() and again.guard == NEVER
    p = again.preset("p")
    assert p.for_run(None) is p and p.for_run(6.4) is p and p.for_run(6.6) is not p
    assert p.for_run(9.0).explicit_forecast["mlp"]["all"] == (7,)
    assert again.preset("q").for_run(9.0) is again.preset("q")  # no variant of q: its own calibration

    model, scheduler = tiny_wan_transformer(4), _scheduler()
    for guidance, forecast_step in ((5.0, 4), (8.0, 7)):
        engine = vc.apply_to_transformer(model, scheduler, profile, "p", guidance_scale=guidance)
        _denoise(model, scheduler)
        actions = engine.table.actions
        vc.remove(model)
        assert actions[forecast_step, 0, 2] == Action.FORECAST and actions[forecast_step, 0, 0] == Action.COMPUTE


@pytest.mark.parametrize("change, message", [
    (lambda d: d["variants"][0]["presets"].update(x={}), "variants[0]: preset 'x' is not one"),
    (lambda d: d["variants"][0].update(guidance_scale=5.0), "each (guidance scale, steps) once"),
    (lambda d: d["variants"][0].update(steps=6), "explicit_forecast.mlp"),  # step 7 of a 6-step calibration
    (lambda d: d.pop("guidance_scale"), "variants need the guidance_scale"),
    (lambda d: d["guard"].update(threshold=-1), "guard: guard: threshold must be a number > 0"),
    (lambda d: d["guard"].update(sigmas=[0.0, 1.0]), "sigmas must be strictly descending"),
    (lambda d: d.update(guard={"threshold": 1}), "guard must be a mapping of threshold, sigmas, drift_rate"),
])
def test_malformed_guard_or_variants_are_one_line_errors(change, message):
    raw = copy.deepcopy(_profile_dict())
    change(raw)
    with pytest.raises(vc.ProfileError) as info:
        vc.Profile.from_dict(raw, "tiny.yaml")
    assert message.split(": guard")[0] in str(info.value) and "\n" not in str(info.value)


def test_guard_true_needs_a_calibrated_guard():
    raw = _profile_dict()
    raw.pop("guard")
    with pytest.raises(ValueError, match="profile tiny has no guard calibration; add one with videocache profile --guard-only"):
        vc.apply_to_transformer(tiny_wan_transformer(4), _scheduler(), vc.Profile.from_dict(raw), "p", guard=True)


def test_variants_at_another_guidance_scale_or_step_count_are_added_and_picked_by_the_run():
    base = vc.Profile.from_dict({k: v for k, v in _profile_dict().items() if k != "variants"})
    other = vc.Profile.from_dict({**_profile_dict(), "guidance_scale": 3.0, "variants": []})
    extended = base.with_variant(other)
    assert [v.guidance_scale for v in extended.variants] == [3.0]
    assert extended.preset("p").for_run(2.0) is not extended.preset("p")
    with pytest.raises(vc.ProfileError, match="already calibrated at guidance 5 and 10 steps"):
        base.with_variant(base)
    with pytest.raises(vc.ProfileError, match="another model"):
        base.with_variant(vc.Profile.from_dict({**_profile_dict(), "model": {"architecture": "WanTransformer3DModel",
                                                                             "num_blocks": 6}, "variants": []}))
    # a calibration at 20 steps: runs at guidance 5 pick it from 15 steps on (nearer by ratio), the guidance first
    at20 = vc.Profile.from_dict({**_profile_dict(), "steps": 20, "variants": [],
                                 "presets": {"p": {"explicit": {"mlp": {"all": [3, 17]}}}}})
    both = extended.with_variant(at20)
    again = vc.Profile.from_dict(both.to_dict())
    p = again.preset("p")
    assert [(v.guidance_scale, v.steps) for v in again.variants] == [(3.0, None), (5.0, 20)]
    assert p.for_run(5.0, 10) is p and p.for_run(5.0, 13) is p and p.for_run(5.0, 15).reference_steps == 20
    assert p.for_run(3.0, 20).reference_steps == 10 and p.for_run(3.0, 20).guidance_scale is None  # guidance first
    assert p.for_run(5.0, 20).explicit["mlp"]["all"] == (3, 17)


# -- sequence parallelism: the ranks agree on the signal ---------------------------------------------------
def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sigmas = [float(s) for s in _scheduler().sigmas[:STEPS]]
    config = GuardConfig(tuple(sigmas[:-1]), (1.0,) * (STEPS - 1), threshold=0.3)
    # rank 0's half of the tokens doubles each step, rank 1's stays: alone they decide differently
    res = {}
    for name, group in (("agreed", dist.group.WORLD), ("alone", None)):
        guard = TableGuard(config, lambda: np.ones((4, 3)), lambda group=group: group)
        guard.start(_table(), sigmas)
        for step in range(STEPS):
            guard.decide(step, torch.full((64,), 2.0 ** step if rank == 0 else 1.0))
        res[name] = list(guard.forced)
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_take_the_same_guard_decisions_when_their_shards_disagree(tmp_path):
    _spawn(_rank_main, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["alone"] != ranks[1]["alone"], "the shards alone should decide differently"
    assert ranks[0]["agreed"] == ranks[1]["agreed"]


@pytest.mark.parametrize("model", ["reference-wan", "reference-hunyuan", "reference-opensora"])
def test_each_reference_pipeline_runs_the_variant_made_nearest_its_settings(model):
    """Every shipped reference profile has a guidance-8 variant (reference-opensora also a 15-step one), and a
    run takes the calibration made nearest its guidance scale, then its step count: the pipeline exposes the
    call's guidance scale as diffusers pipelines do (Open-Sora's pipeline is ours); `variants=False` keeps the
    profile's own."""
    from videocache.pipelines.loader import load_pipeline

    pipe = load_pipeline(model, device="cpu")
    profile = vc.load_profile(model)
    made_at = [(v.guidance_scale, v.steps or profile.steps) for v in profile.variants]
    assert (8.0, 25) in made_at
    at_10_steps = 15 if (5.0, 15) in made_at else 25
    for guidance, variants, expected in ((8.0, True, (8.0, 25)), (8.0, False, (5.0, 25)),
                                         (5.0, True, (5.0, at_10_steps)), (5.0, False, (5.0, 25))):
        engine = vc.apply(pipe, profile, preset="balanced", variants=variants)
        try:
            pipe("a red circle moving right on a white background", num_inference_steps=10, num_frames=17,
                 height=32, width=32, guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
            assert pipe.guidance_scale == guidance
            assert [(key[2], key[3]) for key in engine._tables._built] == [expected]
        finally:
            vc.remove(pipe)

