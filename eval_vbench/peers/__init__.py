"""The methods a comparison runs, one module per library: diffusers' caches (diffusers_caches), cache-dit
(cachedit) and videocache's own engine with a profile's preset (videocache_engine); the base classes they share
are in spec. `parse_method` hands a spec to its library's module by the spec's first field.
"""

from __future__ import annotations

from . import cachedit, diffusers_caches, videocache_engine
from .spec import (
    VALID_FORMS,
    WARMUP_FRACTION,
    AppliedMethod,
    Method,
    MethodSetup,
    MethodSpecError,
    NoCache,
    family_of,
    spec_error,
)

__all__ = [
    "VALID_FORMS", "WARMUP_FRACTION", "AppliedMethod", "Method", "MethodSetup", "MethodSpecError", "NoCache",
    "family_of", "parse_method", "parse_methods",
]

# each library's spec parser, by the spec's first field
LIBRARY_PARSERS = {
    "videocache": videocache_engine.parse_spec,
    "diffusers": diffusers_caches.parse_spec,
    "cachedit": cachedit.parse_spec,
}


def parse_method(spec: str) -> Method:
    """Parse one spec; raise MethodSpecError (a ValueError, one line, listing the valid forms) otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise spec_error(str(spec), "empty")
    text = spec.strip()
    parts = text.split(":")
    if text.lower() == "none":
        return NoCache()
    parse = LIBRARY_PARSERS.get(parts[0].lower())
    if parse is None:
        raise spec_error(text)
    return parse(text, parts)


def parse_methods(specs: list[str]) -> list[Method]:
    """Parse every spec, `none` first and exactly once, duplicates (by canonical form) dropped."""
    methods: list[Method] = [NoCache()]
    seen = {"none"}
    for spec in specs:
        method = parse_method(spec)
        if method.spec not in seen:
            seen.add(method.spec)
            methods.append(method)
    return methods
