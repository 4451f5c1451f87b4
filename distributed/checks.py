"""Parallel settings and the checks that run before any model is loaded (no torch.distributed needed)."""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """An impossible parallel configuration; the message is one line that says what to fix."""


@dataclass(frozen=True)
class ParallelSettings:
    """Degrees of parallelism for one transformer. The tokens of one guidance branch are shared by
    `ring x ulysses` ranks: Ulysses ranks exchange heads for tokens around attention (all-to-all), ring
    ranks pass key/value blocks around and merge the partial attentions by their log-sum-exp; both (USP)
    is Ulysses inside ring. `cfg` (1 or 2) groups of ranks compute the two classifier-free-guidance
    branches. The world is cfg x ring x ulysses processes; rank = (cfg_i * ring + ring_i) * ulysses + ulysses_i."""

    ulysses: int = 1
    cfg: int = 1
    ring: int = 1

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * self.cfg

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def flags(self) -> str:
        parts = [f"--ulysses {self.ulysses}"] if self.ulysses > 1 or (self.cfg == 1 and self.ring == 1) else []
        if self.ring > 1:
            parts.append(f"--ring {self.ring}")
        if self.cfg == 2:
            parts.append("--cfg-parallel")
        return " ".join(parts)


def uneven_heads_supported(heads: int, degree: int) -> bool:
    """Whether diffusers' "Ulysses anything" attention can spread `heads` over `degree` ranks: it pads
    the heads to a multiple of the degree, and only as long as the padding is less than the heads each
    rank then holds."""
    if heads % degree == 0:
        return True
    pad = degree - heads % degree
    return pad < (heads + pad) // degree


def check_settings(
    settings: ParallelSettings,
    world_size: int,
    *,
    tokens: int | None = None,
    heads: int | None = None,
    guidance_scale: float | None = None,
) -> None:
    """Raise ParallelConfigError (one line) for a configuration that cannot run; None values are not checked."""
    u, c, r = settings.ulysses, settings.cfg, settings.ring
    for flag, value in (("--ulysses", u), ("--ring", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParallelConfigError(f"{flag} must be an integer >= 1; got {value!r}")
    if c not in (1, 2):
        raise ParallelConfigError(f"the CFG-parallel degree must be 1 or 2 (two guidance branches); got {c!r}")
    if settings.world_size != world_size:
        need = settings.world_size
        what = f"{settings.flags()} needs {need} process{'es' if need > 1 else ''}"
        factors = [str(d) for d in (c, r, u) if d > 1]
        if len(factors) > 1:
            what = f"{settings.flags()} needs {' x '.join(factors)} = {need} processes"
        raise ParallelConfigError(
            f"{what}, but {world_size} {'was' if world_size == 1 else 'were'} launched: run `accelerate launch "
            f"--multi_gpu --num_processes {need} --num_machines 1 scripts/generate.py ...` (or torchrun "
            f"--nproc_per_node {need}), or change the degrees so that their product is the process count"
        )
    if c == 2 and guidance_scale is not None and guidance_scale <= 1.0:
        raise ParallelConfigError(
            f"--cfg-parallel splits the two classifier-free-guidance branches, but --guidance-scale {guidance_scale:g} "
            "turns guidance off (it needs > 1)"
        )
    n = settings.sequence_degree
    if n > 1 and tokens is not None and tokens < n:
        raise ParallelConfigError(
            f"{settings.flags()} splits the {tokens} video tokens of this size over {n} ranks, more ranks than "
            f"tokens: use at most {tokens} sequence-parallel ranks or a larger video"
        )
    if u > 1 and r > 1 and tokens is not None and tokens % n:
        raise ParallelConfigError(
            f"--ulysses {u} with --ring {r} needs a token count divisible by {n}; this video has {tokens}: use "
            "--ulysses or --ring alone (both split uneven counts) or another size"
        )
    if u > 1 and r > 1 and heads is not None and heads % u:
        raise ParallelConfigError(
            f"--ulysses {u} with --ring {r} needs the {heads} attention heads divisible by {u}: use --ring alone or a "
            "Ulysses degree that divides the heads"
        )
    if u > 1 and heads is not None and not uneven_heads_supported(heads, u):
        ok = [d for d in range(2, heads + 1) if uneven_heads_supported(heads, d)]
        raise ParallelConfigError(
            f"the model's {heads} attention heads cannot be spread over --ulysses {u} (padding {u - heads % u} "
            f"heads is not less than the {(heads + u - heads % u) // u} each rank would hold): use one of "
            f"{', '.join(map(str, ok[:12]))}"
        )
