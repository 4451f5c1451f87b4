"""The engine's per-call path reads no tensor value on the host (what would synchronise with a GPU).

On the CPU a host read cannot be seen as a synchronisation, so the test makes every way of reading a
tensor's value on the host (`.item()`, `float()`, `int()`, `bool()`, `.tolist()`, `.numpy()`, `.cpu()`)
fail when called from videocache's own files (the engine and the Wan and Open-Sora adapters), and runs transformer calls as WanPipeline makes them
(steps and sigmas in the cache context) with each kind of table."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import videocache as vc
from videocache import Action, CacheTable
from videocache.pipelines.reference.build import tiny_wan_transformer

READS = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu", "__index__")
ADAPTERS = ("pipelines/wan/adapter.py", "pipelines/opensora/adapter.py")  # guarded like the engine (tests/test_opensora_adapter.py)
STEPS = 8


class HostRead(AssertionError):
    pass


@pytest.fixture
def no_host_reads(monkeypatch):
    def guard(name):
        original = getattr(torch.Tensor, name)

        def checked(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if ("/videocache/" in caller or caller.endswith(ADAPTERS)) and "/tests/" not in caller:
                raise HostRead(f"{name} called from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, checked)

    for name in READS:
        guard(name)


def tables() -> dict[str, CacheTable]:
    aligned = np.zeros((STEPS, 4, 3), dtype=np.int8)
    aligned[[2, 4, 6]] = int(Action.REUSE)
    aligned[5] = int(Action.FORECAST)
    split = np.zeros((STEPS, 4, 3), dtype=np.int8)
    split[3:7:2, 0::2, 0] = int(Action.REUSE)
    split[3:7:2, 1::2, 2] = int(Action.FORECAST)
    runs = np.zeros((STEPS, 1), dtype=np.int8)
    runs[[3, 5]] = int(Action.REUSE)
    return {
        "fused": CacheTable(aligned),
        "split": CacheTable(split),
        "block runs": CacheTable(np.zeros((STEPS, 4, 3), dtype=np.int8), block_runs=((1, 2),), run_actions=runs),
    }


@pytest.mark.parametrize("name", ["fused", "split", "block runs"])
@pytest.mark.parametrize("storage", [{}, {"cache_dtype": torch.int8}])
def test_per_call_path_reads_no_tensor_value(no_host_reads, name, storage):
    model = tiny_wan_transformer(4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    sigmas = [float(s) for s in scheduler.sigmas]  # the pipeline's own reads, outside the engine
    engine = vc.apply_to_transformer(model, None, tables()[name], **storage)
    x = torch.randn(1, 4, 3, 8, 8)
    text = torch.randn(1, 6, 16)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            for context in ("cond", "uncond"):
                with model.cache_context(context, step_index=i, num_inference_steps=STEPS, sigma=sigmas[i]):
                    model(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)
    stats = engine.stats()
    assert stats["computed_fraction"] < 1 and stats["fallbacks"] == 0
    vc.remove(model)


def test_the_guard_catches_a_host_read(no_host_reads):
    from videocache.forecast import newton_extrapolate

    with pytest.raises(HostRead):
        newton_extrapolate([0, 1], [torch.ones(2), torch.ones(2)], torch.tensor(2))  # a tensor step: float()
