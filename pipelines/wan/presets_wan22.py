"""Wan2.2 stand-in profiles, without the weights: T2V-A14B and I2V-A14B (two experts of Wan2.1-14B's architecture,
40 blocks) and TI2V-5B (one transformer, 30 blocks), with their computed fractions at their default step counts.

The sources we have publish no per-step statistics of the Wan2.2 models (MagCache's Wan2.2 page ships commands,
no ratios), so these profiles reuse the Wan2.1 stand-ins of the same architecture (`presets.py`):

* T2V-A14B and I2V-A14B: an experts profile whose two experts run the wan2.1-t2v-14b presets (40 blocks), each on
  its own steps (`videocache.experts`: the switch step is computed, nothing is read across it), with the model's
  boundary (0.875 / 0.9) in the profile. The switch costs one computed step, so the fractions come out a little
  above the 14B profile's budgets; they are counted below.
* TI2V-5B: the wan2.1-t2v-1.3b presets (30 blocks: the same fingerprint), renamed.

Fractions are counted by the engine on tiny random WanTransformer3DModels with the real block counts, driven
by Wan's scheduler (UniPC, flow sigmas) with the official flow shifts (T2V-A14B 12, I2V-A14B and TI2V-5B 5) and,
for A14B, the boundary switch as diffusers' WanPipeline makes it. The quality is unmeasured: with the weights,
calibrate a profile (the command is in each profile).

    python -m videocache.pipelines.wan.presets_wan22 --write-profiles   # write the three profiles, then measure
    python -m videocache.pipelines.wan.presets_wan22                    # measure: benchmarks/wan22_presets.md/.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

import videocache as vc

from ..reference.build import tiny_wan_transformer
from ..stand_in_presets import ROOT
from .presets import wan_scheduler


@dataclass(frozen=True)
class Wan22:
    name: str
    title: str
    hub: str
    base: str  # the Wan2.1 stand-in profile its presets come from
    blocks: int
    steps: int  # the official default step count
    flow_shift: float  # the official sample_shift
    boundary_ratio: float | None  # two experts switch here; None: one transformer


MODELS = (
    Wan22("wan2.2-t2v-a14b", "Wan2.2 T2V-A14B", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan2.1-t2v-14b", 40, 40, 12.0, 0.875),
    Wan22("wan2.2-i2v-a14b", "Wan2.2 I2V-A14B", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "wan2.1-t2v-14b", 40, 40, 5.0, 0.9),
    Wan22("wan2.2-ti2v-5b", "Wan2.2 TI2V-5B", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan2.1-t2v-1.3b", 30, 50, 5.0, None),
)
PRESETS = ("slow", "balanced", "fast")
SOURCE = ("no published per-step statistics of this model in our sources: the presets are the {base} stand-in's "
          "(same architecture, {blocks} blocks; MagCache's Wan2.1 ratios), {how}; defaults (steps, flow shift"
          "{boundary}) from the official Wan2.2 configs")


def calibrate_command(m: Wan22) -> str:
    return (f"videocache profile --model {m.hub} --prompts prompts.txt --steps {m.steps} --budget 0.6 --budget 0.5 "
            f"--budget 0.34 --preset-names slow balanced fast --out {m.name}.yaml")


def stand_in(m: Wan22) -> vc.Profile | vc.ExpertsProfile:
    base = vc.load_profile(m.base)
    metadata = {
        "made_by": "python -m videocache.pipelines.wan.presets_wan22 --write-profiles",
        "calibrated_on_real_weights": False,
        "calibrate_with_weights": calibrate_command(m),
        "default_steps": m.steps,
        "source": SOURCE.format(
            base=m.base, blocks=m.blocks,
            how="each expert running its own steps of them" if m.boundary_ratio else "renamed",
            boundary="" if m.boundary_ratio is None else f", boundary_ratio {m.boundary_ratio}"),
    }
    if m.boundary_ratio is None:
        return replace(base, name=m.name, metadata=metadata, source="<stand-in>")
    expert = replace(base, metadata={})
    return vc.ExpertsProfile.of(m.name, {"transformer": expert, "transformer_2": expert}, m.boundary_ratio, metadata)


def header(m: Wan22, fractions: dict[str, float]) -> str:
    shares = " / ".join(f"{fractions[p]:.2f}" for p in PRESETS)
    layout = (f"two experts (transformer above boundary_ratio {m.boundary_ratio}, transformer_2 below), "
              f"WanTransformer3DModel, {m.blocks} blocks each" if m.boundary_ratio else
              f"WanTransformer3DModel, {m.blocks} blocks")
    return "\n".join([
        f"# Cache profile for {m.title} ({layout}); its default {m.steps} steps are covered by resampling.",
        "# NOT CALIBRATED on the real weights, and not even derived from this model's own statistics: the presets",
        f"# are the {m.base} stand-in's (same architecture). slow / balanced / fast compute {shares} of the block",
        f"# work at {m.steps} steps (benchmarks/wan22_presets.md). Sources: metadata below.",
        "# Made by",
        "#   python -m videocache.pipelines.wan.presets_wan22 --write-profiles",
        "# With the weights, calibrate a profile instead (prompts.txt: a few prompts, one per line):",
        f"#   {calibrate_command(m)}",
        "",
    ])


@torch.no_grad()
def fractions(m: Wan22) -> dict[str, float]:
    """{preset: computed fraction} at the model's default step count, counted by the engine over a denoising
    loop that switches experts as WanPipeline does."""
    experts = [tiny_wan_transformer(m.blocks, seed) for seed in range(2 if m.boundary_ratio else 1)]
    scheduler = wan_scheduler(m.flow_shift)
    pipe = SimpleNamespace(transformer=experts[0], transformer_2=experts[-1] if m.boundary_ratio else None,
                           scheduler=scheduler, config=SimpleNamespace(boundary_ratio=m.boundary_ratio))
    g = torch.Generator().manual_seed(0)
    x0, text = torch.randn(1, 4, 1, 4, 4, generator=g), torch.randn(1, 4, 16, generator=g)
    out = {}
    for preset in PRESETS:
        scheduler.set_timesteps(m.steps)
        engine = vc.apply(pipe, ROOT / "profiles" / f"{m.name}.yaml", preset, trace=False, num_inference_steps=m.steps)
        x = x0
        try:
            for i, t in enumerate(scheduler.timesteps):
                model = experts[0] if m.boundary_ratio is None or t >= m.boundary_ratio * 1000 else experts[1]
                with model.cache_context("cond", step_index=i, num_inference_steps=m.steps):
                    v = model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]
                x = scheduler.step(v, t, x).prev_sample
            stats = engine.stats()
            out[preset] = {"computed_fraction": round(stats["computed_fraction"], 4),
                           **({"by_expert": {k: round(v, 4) for k, v in stats["computed_fraction_by_expert"].items()}}
                              if "computed_fraction_by_expert" in stats else {})}
        finally:
            vc.remove(pipe)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-profiles", action="store_true", help="write profiles/wan2.2-*.yaml first")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.write_profiles:
        for m in MODELS:
            (ROOT / "profiles" / f"{m.name}.yaml").write_text(stand_in(m).to_yaml())
    result = {"command": "python -m videocache.pipelines.wan.presets_wan22", "models": {}}
    for m in MODELS:
        result["models"][m.name] = {"steps": m.steps, "flow_shift": m.flow_shift, "boundary_ratio": m.boundary_ratio,
                                    "base": m.base, "presets": fractions(m)}
    if args.write_profiles:  # the header states the counted fractions
        for m in MODELS:
            path = ROOT / "profiles" / f"{m.name}.yaml"
            counted = {k: v["computed_fraction"] for k, v in result["models"][m.name]["presets"].items()}
            path.write_text(header(m, counted) + path.read_text())
    out = ROOT / "benchmarks" / "wan22_presets"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = []
    for name, r in result["models"].items():
        for preset, f in r["presets"].items():
            split = ", ".join(f"{k} {v:.3f}" for k, v in f.get("by_expert", {}).items()) or "-"
            rows.append(f"| {name} | {r['steps']} | {preset} | {f['computed_fraction']:.3f} | {split} |")
    out.with_suffix(".md").write_text(
        "# Wan2.2 stand-in profiles: computed fractions at the default step counts\n\n"
        f"`{result['command']}` (one torch thread). Counted by the engine on tiny random WanTransformer3DModels with the "
        "real block counts (two experts for A14B, switched at the model's boundary as WanPipeline does), Wan's "
        "scheduler with the official flow shifts. The presets are the Wan2.1 stand-ins of the same architecture "
        "(`pipelines/wan/presets_wan22.py` says why); their quality is unmeasured.\n\n"
        "| profile | steps | preset | computed fraction | per expert |\n|---|---:|---|---:|---|\n" + "\n".join(rows) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
