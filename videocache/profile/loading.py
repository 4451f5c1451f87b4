"""Loading a profile by name or path into a validated `Profile`."""

from __future__ import annotations

from pathlib import Path

import yaml

from .experts import ExpertsProfile
from .schema import Profile, ProfileError
from .search_path import (
    PROFILE_SUFFIXES,
    PROFILES_ENV,
    _env_profile_dirs,
    available_profiles,
    find_profile,
    profile_dirs,
)


def load_profile(name_or_path: str | Path | Profile | ExpertsProfile) -> Profile | ExpertsProfile:
    """A Profile (an ExpertsProfile where the file names experts) from a bare name (looked up in
    `profile_dirs()`: $VIDEOCACHE_PROFILES, the user folder, then the shipped profiles), a path (a .yaml/.yml
    suffix, a separator, or an existing file), or a profile (returned as is)."""
    if isinstance(name_or_path, Profile | ExpertsProfile):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    is_path = path.suffix in PROFILE_SUFFIXES or "/" in text or "\\" in text or path.is_file()
    if not is_path:
        found = find_profile(text)
        if found is None:
            avail = ", ".join(available_profiles()) or "none"
            env = "" if _env_profile_dirs() else f"${PROFILES_ENV} (unset), "
            where = env + ", ".join(str(d) for d in profile_dirs())
            raise ProfileError(
                f"no profile named {text!r} (available: {avail}; looked in {where}); or pass a path"
            )
        path = found
    if not path.is_file():
        raise ProfileError(f"profile file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or type(e).__name__
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ProfileError(f"{path}: not valid YAML: {problem}{where}") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from None
    if isinstance(data, dict) and "experts" in data:
        return ExpertsProfile.from_dict(data, source=str(path))
    return Profile.from_dict(data, source=str(path))
