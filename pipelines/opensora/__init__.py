"""The Open-Sora 1.2 family (STDiT3): everything videocache knows about it, declared once. The model itself
(STDiT3, its VAE, T5 prompt handling, the rectified-flow schedule and `OpenSoraPipeline`, loading the official
checkpoints) is `model/`; `adapter` (interleaved spatial and temporal blocks), `parallel` (DSP), `probes`,
`flops`, `peers` (including cache-dit's block list), `loading` (defaults and pre-load geometry), `presets` (the
stand-in preset generator). Registered through the `videocache.families` entry point."""

from videocache.family import ModelFamily

from ..reference import REFERENCE_OPENSORA_DIR
from .adapter import OpenSoraAdapter
from .flops import opensora_flop_points
from .loading import OPENSORA_DEFAULTS, opensora_geometry
from .parallel import opensora_parallel_plan
from .peers import OPENSORA_PEERS
from .probes import opensora_attention_probe


def _pipelines() -> list[type]:
    from ..reference.pipeline_opensora import ReferenceOpenSoraPipeline
    from .model.pipeline import OpenSoraPipeline

    return [OpenSoraPipeline, ReferenceOpenSoraPipeline]


FAMILY = ModelFamily(
    name="opensora",
    transformers=("STDiT3Model",),
    adapter=OpenSoraAdapter(),
    parallel_plan=opensora_parallel_plan,
    attention_probe=opensora_attention_probe,
    flop_points=opensora_flop_points,
    peers=OPENSORA_PEERS,
    defaults=OPENSORA_DEFAULTS,
    geometry=opensora_geometry,
    pipelines=_pipelines,
    models={"reference-opensora": REFERENCE_OPENSORA_DIR},
)
