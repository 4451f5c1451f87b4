"""Where profiles are found by name: $VIDEOCACHE_PROFILES, the user folder, then the shipped profiles."""

from __future__ import annotations

import contextlib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

PROFILES_ENV = "VIDEOCACHE_PROFILES"  # os.pathsep-separated folders searched first for a profile name
PROFILE_SUFFIXES = (".yaml", ".yml")


def _shipped_profiles_dir() -> Path:
    """The profiles shipped with the package: package data `videocache.profiles` (the repo's top-level
    `profiles/`, mapped in pyproject.toml), found through importlib.resources so that wheel and editable
    installs both work."""
    try:
        return Path(str(files("videocache.profiles")))
    except ModuleNotFoundError:  # an editable install made before profiles became package data
        return Path(__file__).resolve().parents[2] / "profiles"


PROFILES_DIR = _shipped_profiles_dir()  # the shipped profiles; names are looked up with `profile_dirs()`


def user_profiles_dir() -> Path:
    """`$XDG_CONFIG_HOME/videocache/profiles`, by default `~/.config/videocache/profiles`."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config).expanduser() / "videocache" / "profiles"


def _env_profile_dirs() -> list[Path]:
    return [Path(d).expanduser() for d in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if d.strip()]


def profile_dirs() -> list[Path]:
    """Where a profile name is looked up, first match wins: the folders in $VIDEOCACHE_PROFILES
    (os.pathsep-separated), the user folder (`user_profiles_dir()`), then the shipped profiles."""
    dirs = [*_env_profile_dirs(), user_profiles_dir(), PROFILES_DIR]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def find_profile(name: str) -> Path | None:
    """The file of the profile called `name` (`<name>.yaml` or `.yml` in `profile_dirs()`), or None."""
    for d in profile_dirs():
        for suffix in PROFILE_SUFFIXES:
            path = d / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def available_profiles() -> list[str]:
    """Names of the profiles found in `profile_dirs()` (user folders and the shipped profiles)."""
    names: set[str] = set()
    for d in profile_dirs():
        with contextlib.suppress(OSError):  # a missing or unreadable folder lists nothing
            names.update(p.stem for p in d.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())
    return sorted(names)

def suggest_profiles(arch: Any, blocks: Any) -> str:
    """The installed profiles made for this architecture and block count, as a hint for an error message."""
    matches = []
    for name in available_profiles():
        path = find_profile(name)
        try:
            model = yaml.safe_load(path.read_text()).get("model", {}) if path is not None else {}
            if model.get("architecture") == arch and model.get("num_blocks") == blocks:
                matches.append(name)
        except Exception:  # a broken neighbour must not hide the real error
            continue
    if matches:
        return "available: " + ", ".join(matches)
    return (
        "none is installed; calibrate one with the videocache CLI or write one in "
        f"{user_profiles_dir()} or a folder named in ${PROFILES_ENV}"
    )
