"""Benchmark: how much latent error each latent frame of the shared reference VAE tolerates before the
decoded shape changes colour.

The per-frame quality gate fails on all three references in the same way: the first frames of a video show
another shape colour (red shapes come out yellow). This measures whether the VAE decoder, rather than the
transformers, makes early frames fragile: held-out clips are encoded, Gaussian noise (in the normalised
latent units the transformers work in) is added to one latent frame at a time, and the checker reads the
colour of the image frames that latent frame decodes to (latent frame 0 -> image frame 0, latent frame k ->
frames 4k-3..4k).

    python benchmarks/experiments/decoder_frame_sensitivity.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import render_clip, split_captions
from videocache.pipelines.reference.mask_validation import video_to_latents
from videocache.pipelines.reference.shared import decode_wan_latents, decoded_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.common
from benchmarks.common import environment, markdown_table, reference_pipeline, repo_path, write_results  # noqa: E402

NOISE_LEVELS = (0.1, 0.2, 0.4)


def image_frames(latent_frame: int) -> list[int]:
    return [0] if latent_frame == 0 else list(range(4 * latent_frame - 3, 4 * latent_frame + 1))


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=10, help="held-out captions, one clip each")
    p.add_argument("--draws", type=int, default=3, help="noise draws per (clip, level, latent frame)")
    default_out = str(Path(__file__).with_name("decoder_frame_sensitivity"))
    p.add_argument("--out", default=default_out)
    p.add_argument("--vae-weights", default=None,
                   help="a VAE checkpoint of scripts/train_reference.py to measure instead of the shipped VAE")
    args = p.parse_args()
    pipe = reference_pipeline(args.vae_weights)
    vae = pipe.vae
    _, held_out = split_captions()
    captions = held_out[: args.clips]
    wrong: dict[float, list[float]] = {}
    clean_wrong = 0.0
    for i, caption in enumerate(tqdm(captions, desc="clips")):
        z = video_to_latents(pipe, render_clip(caption, seed=10_000 + i).video)
        frames = check_video(decoded_frames(decode_wan_latents(vae, z))).frame_colours
        clean_wrong += sum(c != caption.colour for c in frames) / len(frames)
        for level in NOISE_LEVELS:
            row = wrong.setdefault(level, [0.0] * z.shape[2])
            for k in range(z.shape[2]):
                for draw in range(args.draws):
                    noisy = z.clone()
                    gen = torch.Generator().manual_seed(1000 * i + draw)
                    noisy[:, :, k] += level * torch.randn(noisy[:, :, k].shape, generator=gen)
                    colours = check_video(decoded_frames(decode_wan_latents(vae, noisy))).frame_colours
                    row[k] += sum(colours[f] != caption.colour for f in image_frames(k)) / len(image_frames(k))
    runs = len(captions) * args.draws
    result = {
        "benchmark": "shared reference VAE: share of image frames whose shape colour changes when one latent "
                     "frame gets Gaussian noise (normalised latent units)",
        "command": f"python {repo_path(__file__)}"
                   + (f" --clips {args.clips}" if args.clips != 10 else "") + (f" --draws {args.draws}" if args.draws != 3 else "")
                   + (f" --vae-weights {args.vae_weights}" if args.vae_weights else "")
                   + (f" --out {args.out}" if args.out != default_out else ""),
        "clips": len(captions),
        "draws": args.draws,
        "clean_round_trip_wrong_frames": round(clean_wrong / len(captions), 4),
        "wrong_colour_share": {str(level): [round(v / runs, 3) for v in row] for level, row in wrong.items()},
        "environment": environment(),
    }
    print(json.dumps(result, indent=2))
    latent_frames = len(next(iter(wrong.values())))
    spans = [image_frames(k) for k in range(latent_frames)]
    header = ["noise std", *(f"latent frame {k} (image {f[0]}{'' if len(f) == 1 else f'-{f[-1]}'})"
                             for k, f in enumerate(spans))]
    write_results(args.out, result, [
        f"# Decoder sensitivity per latent frame ({'VAE ' + args.vae_weights if args.vae_weights else 'shared reference VAE'}, "
        f"{len(captions)} held-out clips, {args.draws} noise draws)",
        "",
        f"`{result['command']}`",
        "",
        "Share of image frames whose shape colour changes when Gaussian noise of the given standard deviation "
        "(normalised latent units) is added to one latent frame. Clean round trip: "
        f"{result['clean_round_trip_wrong_frames']:.0%} of frames wrong.",
        "",
        *markdown_table(header, ([level, *(f"{v:.0%}" for v in shares)]
                                 for level, shares in result["wrong_colour_share"].items()), "l" + "r" * latent_frames),
    ])


if __name__ == "__main__":
    main()
