"""Train the embedded reference pipeline (tiny Wan2.1 architecture) on procedural videos.

Stages, each resumable from its checkpoint in --work-dir:
  1. vae          AutoencoderKLWan on short random crops of procedural clips (it is fully convolutional
                  and causal, so it carries over to full 17-frame 64x64 clips);
  2. latents      encode the training clips once, and measure per-channel latent statistics;
  3. transformer  WanTransformer3DModel with Wan's rectified-flow objective (velocity eps - x0);
  4. assemble     WanPipeline.save_pretrained(--out) plus a TRAINING.json record.

    python scripts/train_reference.py --out pipelines/reference/reference-wan

--architecture hunyuan trains reference-hunyuan (HunyuanVideoTransformer3DModel, Llama + CLIP text encoders,
true CFG) on the same clips and latents, encoded by a shipped pipeline's VAE (--vae; no vae/decoder
stages), and assembles a ReferenceHunyuanVideoPipeline folder that names that VAE instead of copying it:

    python scripts/train_reference.py --architecture hunyuan --vae pipelines/reference/reference-wan \
        --work-dir runs/reference_hunyuan --out pipelines/reference/reference-hunyuan \
        --stages clips,latents,transformer,assemble

--architecture opensora trains reference-opensora the same way (our STDiT3Model and a tiny T5, Open-Sora's
time shift and x0 - noise velocity, caption dropout to the model's null caption) and assembles a
ReferenceOpenSoraPipeline folder that names the shared VAE too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, HunyuanVideoPipeline, WanPipeline
from tqdm.auto import tqdm
from transformers import CLIPTextModel, LlamaModel, T5EncoderModel, UMT5EncoderModel

from videocache.pipelines.opensora import schedule as opensora_schedule
from videocache.pipelines.opensora.text import encode_prompts as opensora_encode_prompts
from videocache.pipelines.reference import build, build_hunyuan, build_opensora
from videocache.pipelines.reference.data import render_clip, split_captions


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1], the VAE's input range."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan's frame-by-frame causal decode without the final clamp to [-1, 1].

    The clamp in `vae.decode` zeroes the gradient of every pixel that overshoots, which stalls
    training; inference keeps the clamp.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupted save never corrupts the last good checkpoint


def _render_video(job) -> np.ndarray:
    caption, seed = job
    return render_clip(caption, seed).video


def render_bank(args, work: Path) -> None:
    """Render every training clip once (uint8); the VAE and the latent stage both sample from it."""
    out = work / "clips.pt"
    if out.exists():
        return
    train_caps, _ = split_captions()
    jobs = [(cap, args.seed * 1000 + i) for cap in train_caps for i in range(args.clips_per_caption)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:  # rendering is deterministic per (caption, seed)
        rendered = pool.map(_render_video, jobs, chunksize=16)
        videos = np.stack(list(tqdm(rendered, total=len(jobs), desc="render", dynamic_ncols=True)))
    save_checkpoint(out, videos=torch.from_numpy(videos), captions=[cap.text for cap, _ in jobs])


def vae_phases(args) -> list[dict]:
    """Curriculum: short windows first (cheap), then full-length clips so that the causal cache is
    trained over every temporal chunk a 17-frame video has (short-window training alone leaves the
    later chunks at ~9 dB)."""
    return [
        {"name": "short", "steps": args.vae_steps, "frames": args.vae_frames, "batch": args.vae_batch},
        {"name": "full", "steps": args.vae_full_steps, "frames": 17, "batch": args.vae_full_batch,
         "schedule_steps": args.vae_full_schedule_steps or args.vae_full_steps},
    ]


def train_vae(args, device, work: Path) -> None:
    final = work / "vae_final.pt"
    if final.exists():
        return
    ckpt_path = work / "vae_ckpt.pt"
    vae = build.build_vae().to(device)
    videos = torch.load(work / "clips.pt", weights_only=False)["videos"].numpy()
    total = sum(ph["steps"] for ph in vae_phases(args))
    step = 0
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False) if ckpt_path.exists() else None
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        step = ckpt["step"]
    bar = tqdm(total=total, initial=step, desc="vae", dynamic_ncols=True)
    vae.train()
    begin = 0
    for phase in vae_phases(args):
        end = begin + phase["steps"]
        if step >= end:
            begin = end
            continue
        # Each phase has its own optimiser and cosine schedule, so a resumed run follows the same curriculum.
        opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        if ckpt is not None and ckpt.get("phase") == phase["name"]:
            opt.load_state_dict(ckpt["opt"])
        rng = np.random.default_rng(args.seed + step)
        while step < end:
            local = step - begin
            batch = []
            for _ in range(phase["batch"]):
                video = videos[rng.integers(len(videos))]
                t = rng.integers(0, video.shape[0] - phase["frames"] + 1)
                y, x = rng.integers(0, video.shape[1] - args.vae_crop + 1, size=2)
                window = video[t : t + phase["frames"], y : y + args.vae_crop, x : x + args.vae_crop]
                batch.append(to_tensor(np.ascontiguousarray(window)))
            x = torch.stack(batch).to(device)
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * local / phase.get("schedule_steps", phase["steps"])))
            for g in opt.param_groups:
                g["lr"] = args.vae_lr * min(1.0, (local + 1) / 100) * cosine
            posterior = vae.encode(x).latent_dist
            recon = decode_unclamped(vae, posterior.sample())
            rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + args.vae_kl * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
            bar.update(1)
            bar.set_postfix(phase=phase["name"], loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
            if step % args.ckpt_every == 0 or step == end:
                save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step, phase=phase["name"])
        begin = end
    bar.close()
    save_checkpoint(final, model=vae.state_dict())


SHAPE_DISTANCE = 40.0  # RGB distance (0-255) from a clip's background colour that counts as its shape


def shape_crop(video: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A size x size crop of every frame that contains the moving shape in a random frame, the shape's
    mask (pixels far from the clip's median colour, which is the flat background) and that colour.

    Random crops mostly see background, and a plain pixel loss is dominated by it: the decoder then
    renders a red shape brown. Centring crops on the shape and weighting its pixels fixes both.
    """
    background = np.median(video.reshape(-1, 3), axis=0)
    fg = np.linalg.norm(video.astype(np.float32) - background, axis=-1) > SHAPE_DISTANCE
    height, width = video.shape[1:3]
    ys, xs = np.nonzero(fg[rng.integers(len(video))])
    if len(ys):
        i = rng.integers(len(ys))
        y = int(np.clip(ys[i] - rng.integers(size), 0, height - size))
        x = int(np.clip(xs[i] - rng.integers(size), 0, width - size))
    else:
        y, x = (int(v) for v in rng.integers(0, [height - size + 1, width - size + 1]))
    window = (slice(None), slice(y, y + size), slice(x, x + size))
    return np.ascontiguousarray(video[window]), fg[window].astype(np.float32), background


def train_decoder(args, device, work: Path) -> None:
    """Fine-tune only post_quant_conv + decoder on full clips, from the frozen encoder's posterior mean.

    The latents the transformer learns depend on the encoder alone, so this stage is independent of
    the transformer stage (they may run at the same time) and sharpens reconstruction for free.
    """
    final = work / "vae_decoder_final.pt"
    if final.exists():
        return
    vae = load_trained_vae(args, device, work, "vae_final.pt")  # with --vae, a shipped decoder continues
    latent_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    trainable = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    vae.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    ckpt_path = work / "decoder_ckpt.pt"
    step = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    videos = torch.load(work / "clips.pt", weights_only=False)["videos"].numpy()
    rng = np.random.default_rng(args.seed + 7 + step)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 8 + step)
    bar = tqdm(total=args.decoder_steps, initial=step, desc="decoder", dynamic_ncols=True)
    while step < args.decoder_steps:
        crops, weights, backgrounds = [], [], []
        for _ in range(args.vae_full_batch):
            crop, fg, background = shape_crop(videos[rng.integers(len(videos))], args.vae_crop, rng)
            crops.append(to_tensor(crop))
            weights.append(torch.from_numpy(1.0 + (args.decoder_fg_weight - 1.0) * fg))
            backgrounds.append(torch.from_numpy(background).float().div(127.5).sub(1.0))
        x = torch.stack(crops).to(device)
        w = torch.stack(weights)[:, None].to(device)  # (B, 1, F, H, W), broadcast over RGB
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
            # The causal decoder renders latent frame 0 alone, and small errors there (a transformer's) change
            # image frame 0's colour (benchmarks/experiments/decoder_frame_sensitivity.md): train it to decode
            # noisy latents into the clean clip. Noise std uniform in [0, max) per clip, normalised latent units.
            for frames, largest in ((slice(None), args.decoder_noise), (slice(0, 1), args.decoder_frame0_noise)):
                if largest > 0:
                    sigma = largest * torch.rand(len(z), 1, 1, 1, 1, generator=noise_gen, device=device)
                    if args.decoder_clean_fraction > 0:  # this draw skips some clips (both skip: a clean round trip)
                        clean = torch.rand(len(z), 1, 1, 1, 1, generator=noise_gen, device=device)
                        sigma = sigma * (clean >= args.decoder_clean_fraction)
                    noise = torch.randn(z[:, :, frames].shape, generator=noise_gen, device=device)
                    z[:, :, frames] += sigma * latent_std * noise
        recon = decode_unclamped(vae, z)
        if args.decoder_weigh_halos:
            # A colour fringe the decoder paints around the shape (a red square on white rendered with an orange
            # rim: benchmarks/experiments/vae_colour_roundtrip.md) lies on background pixels, weighted 1: weigh
            # every pixel the reconstruction moves off the background like a shape pixel.
            background = torch.stack(backgrounds).to(device).view(-1, 3, 1, 1, 1)
            halo = (recon.detach() - background).norm(dim=1, keepdim=True) > SHAPE_DISTANCE / 127.5
            w = torch.maximum(w, 1.0 + (args.decoder_fg_weight - 1.0) * halo.float())
        w[:, :, 0] *= args.decoder_frame0_weight  # image frame 0 is decoded from latent frame 0 alone
        err = recon - x
        loss = ((err.square() + 0.5 * err.abs()) * w).sum() / (w.sum() * x.shape[1])
        for g in opt.param_groups:
            cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / (args.decoder_schedule_steps or args.decoder_steps)))
            g["lr"] = args.decoder_lr * min(1.0, (step + 1) / 50) * cosine
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        psnr = 10 * math.log10(4.0 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if step % args.ckpt_every == 0 or step == args.decoder_steps:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step)
    bar.close()
    save_checkpoint(final, model=vae.state_dict())


def load_trained_vae(args, device, work: Path, checkpoint: str):
    """The VAE of this run (its checkpoint in --work-dir), or a shipped pipeline's (--vae FOLDER)."""
    if args.vae:
        return AutoencoderKLWan.from_pretrained(Path(args.vae) / "vae").to(device)
    vae = build.build_vae().to(device)
    vae.load_state_dict(torch.load(work / checkpoint, map_location=device)["model"])
    return vae


@torch.no_grad()
def encode_latents(args, device, work: Path) -> None:
    out = work / "latents.pt"
    if out.exists():
        return
    vae = load_trained_vae(args, device, work, "vae_final.pt").eval()
    bank = torch.load(work / "clips.pt", weights_only=False)
    videos = bank["videos"].numpy()
    partial = work / "latents_partial.pt"
    done: dict = torch.load(partial, weights_only=False) if partial.exists() else {"latents": []}
    for start in tqdm(range(len(done["latents"]) * 8, len(videos), 8), desc="encode", dynamic_ncols=True):
        x = torch.stack([to_tensor(v) for v in videos[start : start + 8]]).to(device)
        done["latents"].append(vae.encode(x).latent_dist.mode().cpu())
        if len(done["latents"]) % 20 == 0:
            save_checkpoint(partial, **done)
    latents = torch.cat(done["latents"])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    extra = {}
    if args.vae:  # a shipped VAE decodes with its own statistics: train on latents normalised by those
        extra = {"measured_mean": mean, "measured_std": std}
        mean = torch.tensor(vae.config.latents_mean, dtype=latents.dtype)
        std = torch.tensor(vae.config.latents_std, dtype=latents.dtype)
    save_checkpoint(out, latents=latents, captions=bank["captions"], mean=mean, std=std, **extra)
    partial.unlink(missing_ok=True)


def text_pipeline(args) -> WanPipeline:
    """Tokenizer and frozen text encoder, without a transformer.

    Built from the seed, or with the text encoder loaded from --text-encoder (a saved pipeline folder),
    so that a run under other library versions (a GPU machine, say) trains on the same embeddings.
    """
    pipe = build.build_pipeline(args.seed, with_transformer=False)
    if args.text_encoder:
        encoder = UMT5EncoderModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval().requires_grad_(False)
        pipe.register_modules(text_encoder=encoder)
    return pipe


def hunyuan_text_pipeline(args) -> HunyuanVideoPipeline:
    """HunyuanVideoPipeline's prompt encoding with the reference tokenizers and frozen text encoders (built
    from the seed, or loaded from --text-encoder), without transformer or VAE."""
    parts = build_hunyuan.build_text_components(args.seed)
    if args.text_encoder:
        parts["text_encoder"] = LlamaModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval()
        parts["text_encoder_2"] = CLIPTextModel.from_pretrained(Path(args.text_encoder) / "text_encoder_2").eval()
    return HunyuanVideoPipeline(transformer=None, vae=None, scheduler=build_hunyuan.build_scheduler(), **parts)


def opensora_text_components(args) -> dict:
    """The reference T5 tokenizer and frozen encoder (built from the seed, or loaded from --text-encoder)."""
    parts = build_opensora.build_text_components(args.seed)
    if args.text_encoder:
        parts["text_encoder"] = T5EncoderModel.from_pretrained(Path(args.text_encoder) / "text_encoder").eval()
    return parts


def transformer_lr(args, step: int) -> float:
    """Warm-up then cosine decay per phase; the second phase is a warm restart at a lower peak."""
    begin = 0
    phases = ((args.steps, args.steps, args.lr, 200), (args.steps2, args.steps2_schedule or args.steps2, args.lr2, 100))
    for steps, schedule, peak, warmup in phases:
        if step < begin + steps:
            local = step - begin
            return peak * min(1.0, (local + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * local / schedule)))
        begin += steps
    raise ValueError(f"step {step} is past the last transformer phase")


def train_transformer(args, device, work: Path) -> None:
    final = work / "transformer_final.pt"
    if final.exists():
        return
    data = torch.load(work / "latents.pt", weights_only=False)
    mean, std = data["mean"].view(1, -1, 1, 1, 1), data["std"].view(1, -1, 1, 1, 1)
    latents = ((data["latents"] - mean) / std).to(device)
    captions = sorted(set(data["captions"]))
    # Every caption (and the empty one, for caption dropout) is encoded once, exactly as the pipeline does.
    with torch.no_grad():
        if args.architecture == "hunyuan":
            embeds, pooled, masks = hunyuan_text_pipeline(args).encode_prompt(
                captions + [""], prompt_template=build_hunyuan.PROMPT_TEMPLATE,
                max_sequence_length=build_hunyuan.MAX_SEQUENCE_LENGTH,
            )
            embeds, pooled, masks = embeds.to(device), pooled.to(device), masks.to(device)

            def denoise(model, xt, t, cond):
                return model(xt, t, embeds[cond], masks[cond], pooled[cond], return_dict=False)[0]
        elif args.architecture == "opensora":
            # OpenSoraPipeline's own prompt encoding. A dropped caption is the model's null caption under the
            # prompt's own mask, as the sampler's unconditional branch sees it: row n + i is "caption i dropped".
            text = opensora_text_components(args)
            embeds, masks = opensora_encode_prompts(captions, text["tokenizer"], text["text_encoder"], "cpu",
                                                    build_opensora.MAX_SEQUENCE_LENGTH, clean_caption=False)
            embeds, masks = embeds.repeat(2, 1, 1).to(device), masks.repeat(2, 1).to(device)

            def denoise(model, xt, t, cond):
                null = (cond >= len(captions))[:, None, None]
                y = torch.where(null, model.y_embedder.y_embedding[None].to(embeds.dtype), embeds[cond])
                return model(xt, t, y, masks[cond], fps=build_opensora.FPS, height=64, width=64, return_dict=False)[0]
        else:
            embeds, _ = text_pipeline(args).encode_prompt(
                captions + [""], do_classifier_free_guidance=False, max_sequence_length=build.MAX_SEQUENCE_LENGTH
            )
            embeds = embeds.to(device)

            def denoise(model, xt, t, cond):
                return model(xt, t, embeds[cond], return_dict=False)[0]
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[c] for c in data["captions"]])
    empty_id = len(captions)

    torch.manual_seed(args.seed)
    builders = {"wan": build.build_transformer, "hunyuan": build_hunyuan.build_transformer,
                "opensora": build_opensora.build_transformer}
    model = builders[args.architecture](**args.transformer_config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    step = 0
    ckpt_path = work / "transformer_ckpt.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        ema = ckpt["ema"]
        step = ckpt["step"]
    gen = torch.Generator().manual_seed(args.seed + step)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1 + step)  # noise is drawn where it is used
    params = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
    ema_params = [ema[k] for k, v in model.state_dict().items() if v.dtype.is_floating_point]
    total = args.steps + args.steps2
    bar = tqdm(total=total, initial=step, desc="transformer", dynamic_ncols=True)
    model.train()
    # The sampler's time distribution: Open-Sora's shift follows the video size relative to the model's base
    # size (64x64, 17 frames at base 64: 2.24, what 512x512 gets in the released model).
    if args.time_shift is not None:  # more (> the sampler's) or fewer training times at high noise
        shift = args.time_shift
    elif args.architecture == "opensora":
        shift = opensora_schedule.shift_ratio(64, 64, 17, base_size=build_opensora.TRANSFORMER_CONFIG["input_sq_size"])
    else:
        shift = build.SCHEDULER_SHIFT
    velocity_sign = -1.0 if args.architecture == "opensora" else 1.0  # Open-Sora predicts x0 - noise
    running = None
    while step < total:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        x0 = latents[idx]
        cond = caption_ids[idx].clone()
        dropped = torch.rand(args.batch, generator=gen) < args.cfg_dropout
        cond[dropped] = cond[dropped] + empty_id if args.architecture == "opensora" else empty_id
        u = torch.rand(args.batch, generator=gen)
        sigma = (shift * u / (1 + (shift - 1) * u)).to(device)  # same shift as the sampler's schedule
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = velocity_sign * (noise - x0)
        lr = transformer_lr(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        # bf16 autocast on a GPU (fp32 master weights); a CPU run stays in fp32.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = denoise(model, xt, sigma * 1000, cond.to(device))
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        bar.update(1)
        if step % 25 == 0 or step == total:  # reading the loss waits for the device: not every step
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.1e}")
        if step % args.ckpt_every == 0 or step == total:
            save_checkpoint(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), ema=ema, step=step)
    bar.close()
    save_checkpoint(final, model=ema)


def reference_pipeline_with_shared_vae(args, work: Path):
    """The trained transformer with its text side and --vae's VAE, as ReferenceHunyuanVideoPipeline or
    ReferenceOpenSoraPipeline."""
    from videocache.pipelines.reference.pipeline_hunyuan import ReferenceHunyuanVideoPipeline
    from videocache.pipelines.reference.pipeline_opensora import ReferenceOpenSoraPipeline

    vae = load_trained_vae(args, "cpu", work, "")
    hunyuan = args.architecture == "hunyuan"
    transformer = (build_hunyuan if hunyuan else build_opensora).build_transformer(**args.transformer_config)
    transformer.load_state_dict(torch.load(work / "transformer_final.pt", map_location="cpu")["model"])
    if hunyuan:
        text = hunyuan_text_pipeline(args)
        return ReferenceHunyuanVideoPipeline(
            text_encoder=text.text_encoder, tokenizer=text.tokenizer, text_encoder_2=text.text_encoder_2,
            tokenizer_2=text.tokenizer_2, transformer=transformer, vae=vae, scheduler=build_hunyuan.build_scheduler(),
        )
    return ReferenceOpenSoraPipeline(**opensora_text_components(args), transformer=transformer.eval(), vae=vae,
                                     scheduler=opensora_schedule.default_scheduler())


def assemble_with_shared_vae(args, work: Path) -> tuple[Path, dict]:
    """The pipeline's save_pretrained(--out) without the VAE folder: it is --vae's, named in
    videocache.json's shared_components relative to --out, so its weights ship once."""
    import shutil

    from videocache.pipelines.reference.shared import SHARED_COMPONENTS_KEY

    if not args.vae:
        raise SystemExit(f"--architecture {args.architecture} needs --vae FOLDER (the pipeline whose VAE it shares)")
    pipe = reference_pipeline_with_shared_vae(args, work)
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "vae")
    shared = Path(os.path.relpath(Path(args.vae).resolve() / "vae", out.resolve())).as_posix()
    return out, {SHARED_COMPONENTS_KEY: {"vae": shared}}


def assemble(args, work: Path, command: str) -> None:
    if args.architecture in ("hunyuan", "opensora"):
        out, meta = assemble_with_shared_vae(args, work)
        write_records(args, work, command, out, meta)
        return
    pipe = text_pipeline(args)
    vae = build.build_vae()
    vae.load_state_dict(torch.load(work / "vae_decoder_final.pt", map_location="cpu")["model"])
    stats = torch.load(work / "latents.pt", weights_only=False)
    vae.register_to_config(latents_mean=stats["mean"].tolist(), latents_std=stats["std"].tolist())
    transformer = build.build_transformer()
    transformer.load_state_dict(torch.load(work / "transformer_final.pt", map_location="cpu")["model"])
    pipe = WanPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=vae,
        scheduler=build.build_scheduler(),
        transformer=transformer,
    )
    out = Path(args.out)
    pipe.save_pretrained(out, safe_serialization=True)
    write_records(args, work, command, out, {})


def write_records(args, work: Path, command: str, out: Path, meta: dict) -> None:
    """TRAINING.json (what ran) and videocache.json (generation defaults, plus `meta`) beside the weights."""
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}
    record = {
        "command": command,
        # One command that runs the same recipe end to end (the stages as run are in `invocations`).
        "reproduce": "python scripts/train_reference.py "
        + " ".join(f"--{k.replace('_', '-')} {shlex.quote(json.dumps(v) if isinstance(v, dict) else str(v))}"
                   for k, v in vars(args).items()
                   if k not in ("stages", "work_dir") and v not in (None, {}) and not (k == "architecture" and v == "wan")),
        "invocations": json.loads((work / "commands.json").read_text()),
        "seed": args.seed,
        "arguments": vars(args),
        "stage_seconds": timings,
        "total_training_seconds": round(sum(timings.values()), 1),
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "finished_unix": time.time(),
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    defaults = {"num_frames": 17, "height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 5.0, "fps": 8}
    (out / "videocache.json").write_text(json.dumps({"generation_defaults": defaults, **meta}, indent=2) + "\n")
    print(f"saved reference pipeline to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


def check_transformer_config(parser: argparse.ArgumentParser, args) -> None:
    """--transformer-config names keys of the architecture's transformer config (reference-wan's is fixed)."""
    if not isinstance(args.transformer_config, dict):
        parser.error("--transformer-config must be a JSON object")
    if not args.transformer_config:
        return
    known = {"hunyuan": build_hunyuan.TRANSFORMER_CONFIG, "opensora": build_opensora.TRANSFORMER_CONFIG}.get(
        args.architecture)
    if known is None:
        parser.error("--transformer-config applies to --architecture hunyuan or opensora")
    unknown = sorted(set(args.transformer_config) - set(known))
    if unknown:
        parser.error(f"--transformer-config: unknown keys {', '.join(unknown)} (known: {', '.join(known)})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pipelines/reference/reference-wan", help="pipeline folder to write")
    p.add_argument("--work-dir", default="runs/reference", help="checkpoints and intermediate data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-frames", type=int, default=9)
    p.add_argument("--vae-crop", type=int, default=32)
    p.add_argument("--vae-full-steps", type=int, default=1000, help="second phase on full 17-frame windows")
    p.add_argument("--vae-full-batch", type=int, default=4)
    p.add_argument("--vae-full-schedule-steps", type=int, default=None,
                   help="length of the full phase's cosine schedule (default: --vae-full-steps)")
    p.add_argument("--decoder-steps", type=int, default=1500, help="decoder-only fine-tuning steps")
    p.add_argument("--decoder-schedule-steps", type=int, default=None,
                   help="length of the decoder's cosine schedule (default: --decoder-steps)")
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--decoder-fg-weight", type=float, default=4.0,
                   help="loss weight of the moving shape's pixels relative to the background's")
    p.add_argument("--decoder-frame0-noise", type=float, default=0.0,
                   help="decoder fine-tuning: largest std of the noise added to latent frame 0 (normalised latent units)")
    p.add_argument("--decoder-noise", type=float, default=0.0,
                   help="decoder fine-tuning: largest std of the noise added to every latent frame (normalised units)")
    p.add_argument("--decoder-clean-fraction", type=float, default=0.0,
                   help="decoder fine-tuning: chance that each noise draw (--decoder-noise, --decoder-frame0-noise) "
                   "skips a clip, so that some clips decode from clean latents as in a round trip")
    p.add_argument("--decoder-frame0-weight", type=float, default=1.0,
                   help="decoder fine-tuning: loss weight of image frame 0 relative to the others")
    p.add_argument("--decoder-weigh-halos", action="store_true",
                   help="decoder fine-tuning: weigh background pixels the reconstruction moves off the background "
                   "colour like shape pixels (--decoder-fg-weight), against colour fringes")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--clips-per-caption", type=int, default=6)
    p.add_argument("--steps", type=int, default=3000, help="transformer optimisation steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--steps2", type=int, default=0, help="second transformer phase (warm restart), steps")
    p.add_argument("--lr2", type=float, default=3e-4, help="second transformer phase, peak learning rate")
    p.add_argument("--steps2-schedule", type=int, default=None,
                   help="length of the second phase's cosine schedule (default: --steps2)")
    p.add_argument("--time-shift", type=float, default=None,
                   help="shift of the training times (default: the sampler's; larger puts more at high noise)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--text-encoder", default=None,
                   help="load the frozen text encoder from this saved pipeline folder instead of building it from the seed")
    p.add_argument("--architecture", choices=("wan", "hunyuan", "opensora"), default="wan",
                   help="wan: reference-wan (WanTransformer3DModel); hunyuan: reference-hunyuan "
                   "(HunyuanVideoTransformer3DModel, Llama + CLIP text encoders, true CFG)")
    p.add_argument("--transformer-config", type=json.loads, default={},
                   help="JSON overrides of the hunyuan or opensora transformer's config, e.g. "
                   "'{\"patch_size\": 2}' (more video tokens); the assembled folder's config records them")
    p.add_argument("--vae", default=None,
                   help="use the trained VAE of this saved pipeline folder (no vae/decoder stages); "
                   "--architecture hunyuan needs it: reference-hunyuan shares reference-wan's VAE")
    p.add_argument("--stages", default="clips,vae,latents,transformer,decoder,assemble")
    args = p.parse_args(argv)
    check_transformer_config(p, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    history_path = work / "commands.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    history_path.write_text(json.dumps([*history, {"command": command, "started_unix": time.time()}], indent=1))
    timings_path = work / "timings.json"
    stages = {"clips": lambda: render_bank(args, work), "vae": lambda: train_vae(args, device, work), "latents": lambda: encode_latents(args, device, work),
              "transformer": lambda: train_transformer(args, device, work),
              "decoder": lambda: train_decoder(args, device, work)}
    for name in args.stages.split(","):
        if name == "assemble":
            assemble(args, work, command)
            continue
        t0 = time.time()
        stages[name]()
        # Re-read: stages may run as separate processes at the same time. Resumed runs add up.
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        timings[name] = round(timings.get(name, 0.0) + time.time() - t0, 1)
        timings_path.write_text(json.dumps(timings))


if __name__ == "__main__":
    main()
