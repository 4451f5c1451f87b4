"""Cache profiles: a validated YAML file of compact presets for one model architecture.

A profile says which model it is for (checked against the adapter's fingerprint at apply time), which
step counts it covers, and per preset the rules that `build_table` expands into a cache table for a
concrete run. Every mistake in a profile is reported as a one-line `ProfileError` naming the file and the
field to fix. One concern per module: `schema` (the dataclasses and their validation), `search_path`
(where a name is looked up), `loading` (name or path -> Profile), `compile` (preset -> table), `experts` (a profile per expert of a
pipeline with several transformers).
"""

from .compile import build_table
from .experts import ExpertsPreset, ExpertsProfile
from .loading import load_profile
from .schema import (
    MODES,
    SCHEMA_VERSION,
    STAGES,
    BlockRunSpec,
    ModelSpec,
    PresetSpec,
    Profile,
    ProfileError,
    RuleSpec,
    StepPlan,
    StepRule,
    parse_blocks,
    preset_from_dict,
    resolve_blocks,
)
from .search_path import (
    PROFILE_SUFFIXES,
    PROFILES_DIR,
    PROFILES_ENV,
    available_profiles,
    find_profile,
    profile_dirs,
    user_profiles_dir,
)

__all__ = [
    "MODES", "PROFILES_DIR", "ExpertsPreset", "ExpertsProfile", "PROFILES_ENV", "PROFILE_SUFFIXES", "SCHEMA_VERSION", "STAGES", "BlockRunSpec",
    "ModelSpec", "PresetSpec", "Profile", "ProfileError", "RuleSpec", "StepPlan", "StepRule", "available_profiles",
    "build_table", "find_profile", "load_profile", "parse_blocks", "preset_from_dict", "profile_dirs",
    "resolve_blocks", "user_profiles_dir",
]
