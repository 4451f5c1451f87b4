"""Open-Sora 1.2 in videocache: the STDiT3 transformer, the VAE, T5 prompt handling, the rectified-flow
schedule and `OpenSoraPipeline`; the cache adapter is `adapter.py` (registered with the engine lazily)."""

from .pipeline import GENERATION_DEFAULTS, OpenSoraPipeline, OpenSoraPipelineOutput
from .schedule import official_timesteps, set_opensora_timesteps, shift_ratio
from .transformer import OpenSoraLoadError, STDiT3Block, STDiT3Model, load_stdit3
from .vae import OpenSoraVAE

__all__ = [
    "GENERATION_DEFAULTS", "OpenSoraLoadError", "OpenSoraPipeline", "OpenSoraPipelineOutput", "OpenSoraVAE",
    "STDiT3Block", "STDiT3Model", "load_stdit3", "official_timesteps", "set_opensora_timesteps", "shift_ratio",
]
