"""Which weights a pipeline runs beyond its base model (a LoRA), and whether a profile was calibrated on them.

A calibrated table is made for the weights it measured: a LoRA changes what the blocks compute, so a profile
records the LoRA it was calibrated with (`metadata.lora`), and `apply` warns in one line when the pipeline
runs other weights. `pipelines.lora.load_lora` records what it fused on the pipeline (LORA_ATTR); an adapter
loaded through diffusers and left unfused is read from the transformer's peft state. A LoRA fused by hand
leaves no trace and cannot be seen.
"""

from __future__ import annotations

from typing import Any

LORA_ATTR = "_videocache_lora"  # {"name", "sha256", "scale"}: the LoRA pipelines.lora.load_lora fused


def loaded_lora(pipe: Any) -> dict | None:
    """The LoRA this pipeline runs: the record `load_lora` left, else the names of unfused peft adapters of its
    transformer ({"adapters": [...]}), else None (the base weights, as far as can be seen)."""
    record = getattr(pipe, LORA_ATTR, None)
    if record is not None:
        return dict(record)
    transformer = getattr(pipe, "transformer", None)
    if getattr(transformer, "_hf_peft_config_loaded", False):
        adapters = transformer.active_adapters()
        if adapters:
            return {"adapters": sorted(adapters)}
    return None


def describe(lora: dict | None) -> str:
    if lora is None:
        return "the base weights"
    if "adapters" in lora:
        return "unfused LoRA adapters " + ", ".join(lora["adapters"])
    return f"LoRA {lora['name']} at scale {lora['scale']:g}"


def same_lora(a: dict | None, b: dict | None) -> bool:
    """Both the base weights, or the same LoRA file (by content) at the same scale."""
    if a is None or b is None:
        return a is b
    if "sha256" not in a or "sha256" not in b:
        return a == b
    return a["sha256"] == b["sha256"] and abs(float(a["scale"]) - float(b["scale"])) <= 1e-6


def lora_mismatch(profile_name: str, calibrated: dict | None, running: dict | None) -> str | None:
    """The one-line warning when a profile calibrated with one LoRA (or none) is applied to other weights."""
    if same_lora(calibrated, running):
        return None
    return (f"videocache: profile {profile_name} was calibrated on {describe(calibrated)}; this pipeline runs "
            f"{describe(running)}: its presets may lose fidelity (videocache profile --lora PATH --quick makes one "
            "for these weights)")
