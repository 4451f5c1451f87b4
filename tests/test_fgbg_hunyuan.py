"""Foreground/background profiling on HunyuanVideo's joint attention: the probe recomputes exactly the
queries and keys the attention processor uses, and scores video tokens only, padded text keys masked."""

from __future__ import annotations

import diffusers.models.transformers.transformer_hunyuan_video as hv
import pytest
import torch

from videocache.fgbg import attention_received
from videocache.pipelines.attention_capture import SelfAttentionCapture, attention_probe
from videocache.pipelines.hunyuan.tiny import tiny_hunyuan
from videocache.pipelines.hunyuan.tiny import tiny_inputs as inputs


@pytest.mark.parametrize("pad", [0, 3])
def test_probe_reproduces_the_processor_and_keeps_video_columns(monkeypatch, pad):
    model = tiny_hunyuan()
    seen = []
    real = hv.dispatch_attention_fn

    def record(query, key, value, attn_mask=None, **kwargs):
        seen.append((query, key, attn_mask))
        return real(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(hv, "dispatch_attention_fn", record)
    with torch.no_grad(), SelfAttentionCapture(model, chunk=5) as capture:
        capture.armed = True
        model(**inputs(pad=pad), timestep=torch.tensor([500.0]))
        received = capture.take()
    probe = attention_probe(model)
    assert len(probe.modules) == 5 and probe.patch_size == (1, 2, 2)
    blocks = seen[-5:]  # after the token refiner's own attention
    video = 3 * 4 * 4
    for b, (q, k, mask) in enumerate(blocks):
        assert received[b].shape == (1, video)
        want = attention_received(q[:, :video].transpose(1, 2), k.transpose(1, 2), key_mask=mask.reshape(1, 1, -1),
                                  keep=video).mean(dim=1)
        torch.testing.assert_close(received[b], want, rtol=1e-5, atol=1e-7)
        total = attention_received(q[:, :video].transpose(1, 2), k.transpose(1, 2), key_mask=mask.reshape(1, 1, -1))
        assert torch.allclose(total.sum(-1), torch.ones(()), atol=1e-4)  # the softmax spans the text keys
        if pad:
            assert float(total[..., -pad:].abs().max()) == 0.0  # padded text keys receive nothing
