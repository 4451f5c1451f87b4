"""Profiles for pipelines with several transformers (experts, Wan2.2 A14B): one profile per expert, keyed by
the pipeline attribute that holds it, all made for the same run (step count, presets) and the boundary where
the pipeline switches experts. Each expert's presets are indexed by the generation's step; an expert runs
only its own steps of them (`CacheTable.within`).

    schema_version: 1
    name: reference-wan22
    boundary_ratio: 0.875
    experts:
      transformer: {model: ..., steps: 25, presets: ...}     # a profile's body (no schema_version, name)
      transformer_2: {model: ..., steps: 25, presets: ...}
    metadata: {...}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .schema import SCHEMA_VERSION, PresetSpec, Profile, ProfileError, SavedAsYaml, _check_keys, _where


@dataclass(frozen=True)
class ExpertsPreset:
    """One preset of an experts profile: each expert's part of it, by attribute."""

    name: str
    parts: Mapping[str, PresetSpec]

    def check_steps(self, num_steps: int) -> None:
        for part in self.parts.values():
            part.check_steps(num_steps)

    def to_dict(self) -> dict:
        return {attribute: part.to_dict() for attribute, part in self.parts.items()}


@dataclass
class ExpertsProfile(SavedAsYaml):
    """A profile per expert (`experts`, by the pipeline attribute holding it, in the order they run), validated to
    share one run: the same step count and preset names. It answers `steps`, `presets`, `preset(name)` and
    `check_steps` as a single profile does, so that the CLI's checks before loading a model take either."""

    name: str
    experts: dict[str, Profile]
    boundary_ratio: float | None = None  # where the pipeline the profile was made on switches experts
    metadata: dict = field(default_factory=dict)
    source: str = "<profile>"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ProfileError(f"schema_version must be {SCHEMA_VERSION}; got {self.schema_version!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"name must be a non-empty string; got {self.name!r}")
        if not isinstance(self.experts, Mapping) or len(self.experts) < 2:
            raise ProfileError("experts: name two or more, each by the pipeline attribute holding it (transformer, ...)")
        ratio = self.boundary_ratio
        if ratio is not None and not (isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 < ratio < 1):
            raise ProfileError(f"boundary_ratio must be a number between 0 and 1; got {ratio!r}")
        if not isinstance(self.metadata, dict):
            raise ProfileError("metadata must be a mapping")
        first_name, first = next(iter(self.experts.items()))
        for attribute, expert in self.experts.items():
            with _where(f"experts.{attribute}"):
                if expert.steps != first.steps:
                    raise ProfileError(f"steps ({expert.steps}) differ from {first_name}'s ({first.steps}): the experts "
                                       "share one run")
                if list(expert.presets) != list(first.presets) or expert.default_preset != first.default_preset:
                    raise ProfileError(f"presets ({', '.join(expert.presets)}, default {expert.default_preset}) differ "
                                       f"from {first_name}'s ({', '.join(first.presets)}, default {first.default_preset})")

    # -- what a single profile answers too ------------------------------------------------------
    @property
    def steps(self) -> int:
        return next(iter(self.experts.values())).steps

    @property
    def default_preset(self) -> str:
        return next(iter(self.experts.values())).default_preset

    @property
    def presets(self) -> dict[str, ExpertsPreset]:
        return {name: self.preset(name) for name in next(iter(self.experts.values())).presets}

    def preset(self, name: str | None = None) -> ExpertsPreset:
        key = self.default_preset if name is None else name
        return ExpertsPreset(key, {attribute: expert.preset(key) for attribute, expert in self.experts.items()})

    def check_steps(self, num_steps: int) -> None:
        self.preset().check_steps(num_steps)

    # -- (de)serialisation ------------------------------------------------------------------------
    @classmethod
    def of(cls, name: str, experts: Mapping[str, Profile], boundary_ratio: float | None = None,
           metadata: dict | None = None) -> ExpertsProfile:
        """An experts profile from one profile per expert (their names and sources are replaced)."""
        return cls(name, {a: Profile.from_dict(_body(p.to_dict()) | {"schema_version": SCHEMA_VERSION, "name": f"{name}.{a}"},
                                               f"experts.{a}") for a, p in experts.items()},
                   boundary_ratio, dict(metadata or {}))

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            **({"boundary_ratio": self.boundary_ratio} if self.boundary_ratio is not None else {}),
            "experts": {attribute: _body(expert.to_dict()) for attribute, expert in self.experts.items()},
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<profile>") -> ExpertsProfile:
        """Parse and validate; every error is a one-line ProfileError prefixed with `source`."""
        try:
            with _where("profile"):
                top = _check_keys(data, ("schema_version", "name", "experts"), ("boundary_ratio", "metadata"))
            raw = top["experts"]
            if not isinstance(raw, Mapping):
                raise ProfileError("experts must map each expert's pipeline attribute to its profile")
            experts = {}
            for attribute, body in raw.items():
                if not isinstance(body, Mapping):
                    raise ProfileError(f"experts.{attribute} must be a profile's body (model, steps, presets, ...)")
                experts[str(attribute)] = Profile.from_dict(
                    {**body, "schema_version": top["schema_version"], "name": f"{top['name']}.{attribute}"},
                    f"experts.{attribute}")
            return cls(top["name"], experts, top.get("boundary_ratio"), top.get("metadata") or {}, source,
                       top["schema_version"])
        except ProfileError as e:
            raise ProfileError(f"{source}: {e}") from None


def _body(data: dict) -> dict:
    """A profile's dict without what the experts profile holds once (schema_version, name)."""
    return {k: v for k, v in data.items() if k not in ("schema_version", "name")}
