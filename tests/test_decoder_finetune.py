"""The decoder stage of scripts/train_reference.py continuing a shipped VAE (--vae), with noise on latent frame 0
(--decoder-frame0-noise), its loss options (clean clips, frame-0 weight, colour fringes), and the checkpoint swapped
into a loaded pipeline (evaluate.py --vae-weights)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from videocache.pipelines.loader import REFERENCE_DIR
from videocache.pipelines.reference.data import render_clip, split_captions
from videocache.pipelines.reference.shared import load_vae_weights

pytestmark = pytest.mark.skipif(not (REFERENCE_DIR / "vae").is_dir(), reason="shipped reference-wan VAE not present")


def fine_tune(tmp_path, name: str, noise: float, *options: str) -> dict:
    sys.path.insert(0, str(REFERENCE_DIR.parents[2] / "scripts"))
    import train_reference

    work = tmp_path / name
    work.mkdir()
    train, _ = split_captions()
    videos = np.stack([render_clip(caption, seed=i).video for i, caption in enumerate(train[:2])])
    torch.save({"videos": torch.from_numpy(videos)}, work / "clips.pt")
    train_reference.main(["--vae", str(REFERENCE_DIR), "--work-dir", str(work), "--decoder-steps", "2",
                          "--vae-full-batch", "1", "--decoder-frame0-noise", str(noise), "--stages", "decoder", *options])
    return torch.load(work / "vae_decoder_final.pt", weights_only=False)["model"]


def test_decoder_continues_the_shipped_vae_and_keeps_its_encoder(tmp_path):
    shipped = AutoencoderKLWan.from_pretrained(REFERENCE_DIR / "vae").state_dict()
    clean, noisy = fine_tune(tmp_path, "clean", 0.0), fine_tune(tmp_path, "noisy", 0.5)
    for key, value in shipped.items():
        if key.startswith(("encoder.", "quant_conv.")):  # the latents the transformers learnt stay as they were
            assert torch.equal(clean[key], value) and torch.equal(noisy[key], value), key
    decoder = [k for k in shipped if k.startswith("decoder.")]
    assert any(not torch.equal(clean[k], shipped[k]) for k in decoder)
    assert any(not torch.equal(clean[k], noisy[k]) for k in decoder)  # the frame-0 noise reaches the loss

    vae = AutoencoderKLWan.from_pretrained(REFERENCE_DIR / "vae")
    load_vae_weights(vae, tmp_path / "noisy" / "vae_decoder_final.pt")
    assert all(torch.equal(vae.state_dict()[k], noisy[k]) for k in decoder)


def test_decoder_loss_options(tmp_path):
    clean = fine_tune(tmp_path, "clean", 0.0)
    decoder = [k for k in clean if k.startswith("decoder.")]
    # Every clip drawn clean: the frame-0 noise is drawn but never added, so the run is the noise-free one.
    all_clean = fine_tune(tmp_path, "all_clean", 0.5, "--decoder-clean-fraction", "1.0")
    assert all(torch.equal(all_clean[k], clean[k]) for k in decoder)
    for name, options in (("frame0", ("--decoder-frame0-weight", "4")), ("halos", ("--decoder-weigh-halos",))):
        weighted = fine_tune(tmp_path, name, 0.0, *options)  # each weighting reaches the loss
        assert any(not torch.equal(weighted[k], clean[k]) for k in decoder), name
