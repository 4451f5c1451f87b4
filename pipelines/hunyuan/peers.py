"""What the peer-method wrappers need on HunyuanVideo: diffusers TaylorSeer's default identifiers hook the
blocks' `attn` (pre-gate outputs, the "attn" scope); the per-component form caches the dual-stream blocks'
attention and feed-forwards and the single-stream blocks' fused proj_out, while their attention and MLP input
projection are skipped."""

from videocache.family import PeerSettings

HUNYUAN_PEERS = PeerSettings(
    taylorseer_modules={
        "components": ([r"transformer_blocks\.\d+\.(attn|ff|ff_context)", r"single_transformer_blocks\.\d+\.proj_out"],
                       [r"single_transformer_blocks\.\d+\.(attn|proj_mlp)"]),
        "attn": (None, None),
    },
)
