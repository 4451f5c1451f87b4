"""The Wan family (Wan2.1 text- and image-to-video, `WanTransformer3DModel`): everything videocache knows
about it, declared once. `adapter` (where the cacheable components are), `parallel` (sequence and CFG
parallelism), `probes` (fg/bg attention), `flops` (FLOP-count points), `peers` (peer-method knobs),
`loading` (defaults and pre-load geometry), `experts` (Wan2.2 A14B's two transformers), `presets` (the stand-in preset generator for the real models'
profiles). Registered through the `videocache.families` entry point in pyproject.toml."""

from videocache.family import ModelFamily

from ..reference import REFERENCE_DIR, REFERENCE_WAN22_DIR, REFERENCE_WAN22_I2V_DIR
from .adapter import WanAdapter
from .experts import wan_denoisers
from .flops import wan_flop_points
from .loading import WAN_DEFAULTS, wan_geometry
from .parallel import wan_parallel_plan
from .peers import WAN_PEERS
from .probes import wan_attention_probe

FAMILY = ModelFamily(
    name="wan",
    transformers=("WanTransformer3DModel",),
    adapter=WanAdapter(),
    parallel_plan=wan_parallel_plan,
    attention_probe=wan_attention_probe,
    flop_points=wan_flop_points,
    peers=WAN_PEERS,
    defaults=WAN_DEFAULTS,
    geometry=wan_geometry,
    models={"reference-wan": REFERENCE_DIR, "reference-wan22": REFERENCE_WAN22_DIR,
            "reference-wan22-i2v": REFERENCE_WAN22_I2V_DIR},
    denoisers=wan_denoisers,
)
