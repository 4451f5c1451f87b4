"""Stage `transformer`: the architecture's transformer trained with rectified flow on the normalised latents
(velocity between noise and x0, times drawn with the sampler's shift, caption dropout, EMA weights).

A two-expert architecture (wan22) trains its experts one after the other, each on its own range of noise
levels (the high-noise expert at sigma >= --boundary-ratio, the low-noise one below), both started from
--init-transformer's weights. --frame0-weight weighs latent frame 0 in the loss (the first frames that every
reference gets wrong). --lora-rank R trains a LoRA adapter on --init-transformer's frozen weights instead (the
final checkpoint holds the adapter's EMA weights alone)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architectures import ARCHITECTURES
from .common import save_checkpoint

# The linear layers a reference LoRA adapts in every Wan block: both attentions' projections and the MLP's.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


def add_lora(model: torch.nn.Module, rank: int) -> None:
    """Freeze the model and give it a trainable LoRA adapter of `rank` (peft, as diffusers' training scripts do;
    alpha = rank, so scale 1 applies the adapter as trained)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))


def trained_state(model: torch.nn.Module, args) -> dict[str, torch.Tensor]:
    """What the stage trains, checkpoints and averages: the whole state, or a LoRA's weights alone."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if "lora_" in k} if args.lora_rank else state


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
    experts = ARCHITECTURES[args.architecture].experts
    for expert in experts or (None,):
        _train(args, device, work, expert)


def sigma_range(args, expert: str | None) -> tuple[float, float]:
    """The noise levels an expert trains at: [boundary, 1] for the high-noise one, [0, boundary) for the other."""
    if expert is None:
        return 0.0, 1.0
    return (args.boundary_ratio, 1.0) if expert == "high" else (0.0, args.boundary_ratio)


def _train(args, device, work: Path, expert: str | None) -> None:
    name = "transformer" if expert is None else f"transformer_{expert}"
    final = work / f"{name}_final.pt"
    if final.exists():
        return
    data = torch.load(work / "latents.pt", weights_only=False)
    mean, std = data["mean"].view(1, -1, 1, 1, 1), data["std"].view(1, -1, 1, 1, 1)
    latents = ((data["latents"] - mean) / std).to(device)
    captions = sorted(set(data["captions"]))
    architecture = ARCHITECTURES[args.architecture]
    # Every caption (and the empty one, for caption dropout) is encoded once, exactly as the pipeline does.
    with torch.no_grad():
        denoise = architecture.conditioning(args, captions, device)
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[c] for c in data["captions"]])
    empty_id = len(captions)

    torch.manual_seed(args.seed)
    model = architecture.build_transformer(**args.transformer_config).to(device)
    if args.init_transformer:  # a fine-tune: start from a saved pipeline's transformer
        folder = Path(args.init_transformer)
        # the low-noise expert starts from a two-expert pipeline's own low-noise expert where it has one
        sub = "transformer_2" if expert == "low" and (folder / "transformer_2").is_dir() else "transformer"
        start = type(model).from_pretrained(folder / sub, torch_dtype=torch.float32)
        own, state = model.state_dict(), start.state_dict()
        for key, value in state.items():
            if own[key].shape != value.shape:  # more input channels (image-to-video): the new ones start at zero
                grown = torch.zeros_like(own[key])
                grown[:, : value.shape[1]] = value
                state[key] = grown
        model.load_state_dict(state)
    if args.lora_rank:  # only the adapter trains; the checkpoints and the EMA hold its weights alone
        add_lora(model, args.lora_rank)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in trained_state(model, args).items()}
    step = 0
    ckpt_path = work / f"{name}_ckpt.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"], strict=not args.lora_rank)
        opt.load_state_dict(ckpt["opt"])
        ema = ckpt["ema"]
        step = ckpt["step"]
    gen = torch.Generator().manual_seed(args.seed + step)
    noise_gen = torch.Generator(device).manual_seed(args.seed + 1 + step)  # noise is drawn where it is used
    params = [v for v in trained_state(model, args).values() if v.dtype.is_floating_point]
    ema_params = [ema[k] for k, v in trained_state(model, args).items() if v.dtype.is_floating_point]
    total = args.steps + args.steps2
    bar = tqdm(total=total, initial=step, desc=name, dynamic_ncols=True)
    model.train()
    # The sampler's time distribution, or more (> the sampler's shift) or fewer training times at high noise.
    shift = architecture.time_shift if args.time_shift is None else args.time_shift
    # the uniform draws u whose shifted times fall in the expert's noise range (the shift maps u to sigma monotonically)
    u_lo, u_hi = (lo / (shift - (shift - 1) * lo) for lo in sigma_range(args, expert))
    conditions = mask = None
    if architecture.image_condition:  # the first frame's latent (stage `conditions`) and its mask, as inputs
        conditions = torch.load(work / "conditions.pt", weights_only=False)["conditions"].to(device)
        mask = torch.zeros(1, 4, *latents.shape[2:], device=device)
        mask[:, :, 0] = 1.0
    frame_weight = None
    if args.frame0_weight not in (None, 1.0):
        frame_weight = torch.ones(1, 1, latents.shape[2], 1, 1, device=device)
        frame_weight[:, :, 0] = args.frame0_weight
    running = None
    while step < total:
        idx = torch.randint(len(latents), (args.batch,), generator=gen)
        x0 = latents[idx]
        cond = caption_ids[idx].clone()
        dropped = torch.rand(args.batch, generator=gen) < args.cfg_dropout
        cond[dropped] = architecture.drop_captions(cond[dropped], empty_id)
        u = u_lo + (u_hi - u_lo) * torch.rand(args.batch, generator=gen)
        sigma = (shift * u / (1 + (shift - 1) * u)).to(device)  # same shift as the sampler's schedule
        noise = torch.randn(x0.shape, generator=noise_gen, device=device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = architecture.velocity_sign * (noise - x0)
        lr = transformer_lr(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        # bf16 autocast on a GPU (fp32 master weights); a CPU run stays in fp32.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if conditions is not None:
                xt = torch.cat([xt, mask.expand(len(idx), -1, -1, -1, -1), conditions[idx.to(device)].float()], dim=1)
            pred = denoise(model, xt, sigma * 1000, cond.to(device))
        if frame_weight is None:
            loss = F.mse_loss(pred.float(), target)
        else:
            loss = ((pred.float() - target) ** 2 * frame_weight).mean() / frame_weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
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
            save_checkpoint(ckpt_path, model=trained_state(model, args), opt=opt.state_dict(), ema=ema, step=step)
    bar.close()
    save_checkpoint(final, model=ema)
