"""What the peer-method wrappers need on Wan: diffusers TaylorSeer's default module names match nothing in
WanTransformer3DModel (it would silently run uncached), so the blocks' components are named here."""

from videocache.family import PeerSettings

WAN_PEERS = PeerSettings(
    taylorseer_modules={
        "components": ([r"^blocks\.\d+\.(attn1|attn2|ffn)$"], None),
        "attn": ([r"^blocks\.\d+\.(attn1|attn2)$"], None),
    },
)
