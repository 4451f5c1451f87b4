"""The reference pipelines: tiny video models trained by `scripts/train_reference.py` on procedural videos
and shipped in the repository, one per architecture, so that everything runs and is measured offline on a CPU.
Each model family names its reference in its declaration (`models`)."""

from pathlib import Path

REFERENCE_ROOT = Path(__file__).resolve().parent
REFERENCE_DIR = REFERENCE_ROOT / "reference-wan"
REFERENCE_WAN22_DIR = REFERENCE_ROOT / "reference-wan22"  # two experts fine-tuned from reference-wan (Wan2.2 A14B's layout)
REFERENCE_WAN22_I2V_DIR = REFERENCE_ROOT / "reference-wan22-i2v"  # its image-to-video fine-tune (Wan2.2 I2V A14B's)
REFERENCE_HUNYUAN_DIR = REFERENCE_ROOT / "reference-hunyuan"
REFERENCE_OPENSORA_DIR = REFERENCE_ROOT / "reference-opensora"
# LoRAs of the references, trained by the same script (--lora-rank), each a folder in diffusers' LoRA format
# that `--lora NAME` finds by name: reference-wan-diagonal (reference-wan's shapes move diagonally)
REFERENCE_LORA_ROOT = REFERENCE_ROOT / "loras"


def is_reference(source: str | Path) -> bool:
    """Whether a pipeline folder is one of the shipped references (they share the procedural captions)."""
    return Path(source).resolve().is_relative_to(REFERENCE_ROOT)
