"""videocache's own engine as a comparison method: a profile (name or YAML path) with one of its presets,
optionally with exposure-bias scaling switched or the fused skip of uniform steps off
the preset's calibration at the profile's guidance scale whatever the run's (`novariants`), and the run-time guard
on or off (`videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise][:novariants][:guard|noguard]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from .spec import AppliedMethod, Method, MethodSetup, spec_error


@dataclass(frozen=True)
class VideocacheMethod(Method):
    """videocache's own engine with a profile (name or YAML path) and an optional preset."""

    profile: str
    preset: str | None = None
    exposure_bias: str | None = None  # None: the profile's setting; "eb": b(t) on; "eb-inv": 1/b(t); "noeb": off
    blockwise: bool = False  # skip uniform steps block by block (the engine's fused skip off), for ablations
    guard: bool | None = None  # None: the profile's setting; True / False: the run-time guard on / off
    variants: bool = True  # False: ignore the profile's variants (ablation)
    family: ClassVar[str] = "videocache"

    @property
    def spec(self) -> str:
        flags = (self.exposure_bias, "blockwise" if self.blockwise else None, None if self.variants else "novariants",
                 None if self.guard is None else ("guard" if self.guard else "noguard"))
        return ":".join(p for p in ("videocache", self.profile, self.preset, *flags) if p)

    def exposure_bias_override(self) -> Any:
        from videocache import ExposureBiasConfig

        if self.exposure_bias is None:
            return None
        if self.exposure_bias == "noeb":
            return False
        return ExposureBiasConfig(enabled=True, sign=-1 if self.exposure_bias == "eb-inv" else 1)

    def config_digest(self) -> str:
        import hashlib

        import videocache

        profile = videocache.load_profile(self.profile)
        parts = (self._parts(profile) if not isinstance(profile, videocache.ExpertsProfile)  # a table per expert:
                 else [[self.exposure_bias, self.blockwise], *map(self._parts, profile.experts.values())])
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def _parts(self, profile: Any) -> list:
        """What of one (expert's) profile this method runs: the preset, its variants, the guard."""
        preset = profile.preset(self.preset)
        guard = profile.guard if self.guard is not False else None
        parts = [preset.to_dict(), self.exposure_bias, self.blockwise]
        if self.variants and profile.variants:  # digests of profiles without variants unchanged
            parts.append([[v.guidance_scale, *([v.steps] if v.steps else []), v.presets[preset.name].to_dict()]
                          for v in profile.variants
                          if preset.name in v.presets])
        if self.guard is not None or (guard is not None and guard.enabled):  # digests without a guard unchanged
            parts.append(None if guard is None or self.guard is False else guard.to_dict())
        return parts

    def apply(self, pipe: Any, setup: MethodSetup) -> AppliedMethod:
        import videocache  # lazily: the engine is optional for every other method

        engine = videocache.apply(
            pipe,
            self.profile,
            preset=self.preset,
            num_inference_steps=setup.num_inference_steps,
            exposure_bias=self.exposure_bias_override(),
            fuse_skipped_steps=not self.blockwise,
            guard=self.guard,
            variants=self.variants,
        )
        return AppliedMethod(
            remove=lambda: videocache.remove(pipe),
            stats=engine.stats,
            reset_stats=getattr(engine, "reset_stats", lambda: None),
            info={"preset": getattr(engine, "preset_name", self.preset)},
        )


def parse_spec(text: str, parts: list[str]) -> VideocacheMethod:
    """A `videocache:...` spec, split at ':' (`parts`); MethodSpecError otherwise."""
    guard = {"guard": True, "noguard": False}.get(parts[-1]) if len(parts) > 2 else None
    if guard is not None:
        parts.pop()
    variants = not (len(parts) > 2 and parts[-1] == "novariants")
    if not variants:
        parts.pop()
    blockwise = len(parts) > 2 and parts[-1] == "blockwise"
    if blockwise:
        parts.pop()
    eb = parts.pop() if len(parts) > 2 and parts[-1] in ("eb", "eb-inv", "noeb") else None
    if len(parts) not in (2, 3) or not all(parts[1:]):
        raise spec_error(text, "expected videocache:PROFILE[:PRESET][:eb|eb-inv|noeb][:blockwise][:novariants][:guard|noguard]")
    return VideocacheMethod(
        profile=parts[1], preset=parts[2] if len(parts) == 3 else None, exposure_bias=eb, blockwise=blockwise,
        guard=guard, variants=variants,
    )
