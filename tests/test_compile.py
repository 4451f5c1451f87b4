"""torch.compile with the cache on: no recompilation after warm-up, compute inside the graphs, decisions
outside, output as eager (CPU, inductor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch._dynamo.utils import counters

import videocache as vc
from videocache import CacheTable
from videocache.pipelines.reference.build import tiny_wan_transformer

from .conftest import requires_reference

STEPS = 10
SETTINGS = dict(prompt="a red circle moving left on a black background", num_frames=5, height=32, width=32,
                num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent")
# compiled and eager kernels sum in other orders; over 10 steps of a float32 model that stays below
TOLERANCE = 1e-4


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


def generate(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe(**SETTINGS, generator=torch.Generator().manual_seed(0)).frames


@pytest.fixture
def reference(reference_pipe):
    fresh_dynamo()
    yield reference_pipe
    vc.remove(reference_pipe)
    for block in reference_pipe.transformer.blocks:
        block._compiled_call_impl = None
    reference_pipe.transformer._compiled_call_impl = None
    torch._dynamo.reset()


@requires_reference
@pytest.mark.parametrize(
    "order, preset, fused",
    [("apply-then-compile", "fast", True), ("compile-then-apply", "balanced", False), ("whole-model", "fast", False)],
)
def test_no_recompilation_after_warm_up(reference, order, preset, fused):
    pipe = reference
    vc.apply(pipe, "reference-wan", preset, fuse_skipped_steps=fused)
    eager = generate(pipe)
    vc.remove(pipe)
    if order == "compile-then-apply":
        pipe.transformer.compile_repeated_blocks()
    engine = vc.apply(pipe, "reference-wan", preset, fuse_skipped_steps=fused)
    if order == "apply-then-compile":
        pipe.transformer.compile_repeated_blocks()
    if order == "whole-model":
        pipe.transformer.compile()
    generate(pipe)  # warm-up: one graph per pattern of served components
    warm = graphs()
    assert engine.compiled and 1 <= warm <= 2 ** 3
    out = generate(pipe)
    assert graphs() == warm, "a generation after warm-up compiled again"
    assert (out - eager).abs().max() <= TOLERANCE * eager.abs().max()
    stats = engine.stats()
    assert stats["computed_fraction"] < 1 and stats["fallbacks"] == 0
    vc.remove(pipe)
    if order != "whole-model":  # the blocks' own compiled calls are given back
        assert all(b._compiled_call_impl is not None for b in pipe.transformer.blocks)


def split_table(blocks: int = 30, steps: int = 8) -> CacheTable:
    """Cells that differ per block and component: self-attention reused on even blocks, MLP forecast on
    odd ones, so blocks see three patterns of served components."""
    arr = np.zeros((steps, blocks, 3), dtype=np.int8)
    for s in range(3, steps - 1, 2):
        arr[s, 0::2, 0] = int(vc.Action.REUSE)
        arr[s, 1::2, 2] = int(vc.Action.FORECAST)
    return CacheTable(arr)


def denoise(transformer, steps: int = 8) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            with transformer.cache_context("cond", step_index=i, num_inference_steps=steps, sigma=float(scheduler.sigmas[i])):
                v = transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]
            x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def test_thirty_blocks_share_their_graphs():
    fresh_dynamo()
    model = tiny_wan_transformer(30)
    vc.apply_to_transformer(model, None, split_table())
    eager = denoise(model)
    model.compile_repeated_blocks()
    denoise(model)
    warm = graphs()
    assert warm <= 3  # one per served pattern (none, self-attention, MLP), whatever the 30 blocks
    out = denoise(model)
    assert graphs() == warm
    assert torch.allclose(out, eager, rtol=TOLERANCE, atol=TOLERANCE)
    vc.remove(model)
    torch._dynamo.reset()


def test_decisions_stay_out_of_the_graph():
    """Every traced operation comes from the model's code or the adapter's block compute, never from the
    engine, its store or its hooks; and the components' matrix products are inside the graphs."""
    fresh_dynamo()
    seen: list[torch.fx.GraphModule] = []

    def recording_backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    model = tiny_wan_transformer(4)
    engine = vc.apply_to_transformer(model, None, split_table(4), compile_options={"backend": recording_backend})
    model.compile_repeated_blocks()
    denoise(model)
    assert engine.compiled and seen
    files = set()
    linear = 0
    for gm in seen:
        for node in gm.graph.nodes:
            files.update(line.split('"')[1] for line in (node.meta.get("stack_trace") or "").splitlines()
                         if line.strip().startswith("File"))
            linear += node.op == "call_function" and "linear" in str(node.target)
    engine_files = {f for f in files if "/videocache/" in f and "/pipelines/" not in f}
    assert engine_files == set(), engine_files
    assert any(f.endswith("pipelines/wan/adapter.py") for f in files)
    assert linear >= 3 * 2  # q/k/v/out projections and the MLP are compiled, not run around the graph
    vc.remove(model)
    torch._dynamo.reset()
