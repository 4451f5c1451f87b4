"""The HunyuanVideo family (`HunyuanVideoTransformer3DModel`, diffusers' classes): everything videocache knows
about it, declared once. `adapter` (dual- and single-stream blocks), `parallel` (the plan diffusers does not
ship), `probes` (fg/bg joint attention), `flops`, `peers`, `loading` (defaults and pre-load geometry),
`presets` (the stand-in preset generator). Registered through the `videocache.families` entry point."""

from videocache.family import ModelFamily

from ..reference import REFERENCE_HUNYUAN_DIR
from .adapter import HunyuanVideoAdapter
from .flops import hunyuan_flop_points
from .loading import HUNYUAN_DEFAULTS, hunyuan_geometry
from .parallel import hunyuan_parallel_plan
from .peers import HUNYUAN_PEERS
from .probes import hunyuan_attention_probe


def _pipelines() -> list[type]:
    from ..reference.pipeline_hunyuan import ReferenceHunyuanVideoPipeline

    return [ReferenceHunyuanVideoPipeline]


FAMILY = ModelFamily(
    name="hunyuan",
    transformers=("HunyuanVideoTransformer3DModel",),
    adapter=HunyuanVideoAdapter(),
    parallel_plan=hunyuan_parallel_plan,
    attention_probe=hunyuan_attention_probe,
    flop_points=hunyuan_flop_points,
    peers=HUNYUAN_PEERS,
    defaults=HUNYUAN_DEFAULTS,
    geometry=hunyuan_geometry,
    pipelines=_pipelines,
    models={"reference-hunyuan": REFERENCE_HUNYUAN_DIR},
)
