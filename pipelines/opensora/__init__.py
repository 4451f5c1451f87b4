"""Open-Sora 1.2 in videocache: the STDiT3 transformer, the VAE, T5 prompt handling, the rectified-flow
schedule and `OpenSoraPipeline` (no cache adapter yet)."""

from .transformer import OpenSoraLoadError, STDiT3Block, STDiT3Model

__all__ = ["OpenSoraLoadError", "STDiT3Block", "STDiT3Model"]
