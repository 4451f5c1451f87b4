"""Per-frame colour through the shared reference VAE alone: encode -> decode rendered clips of the training
captions, per shape colour and background, and count the videos in which the checker reads another colour
in some frame (the per-frame gate's question, with no transformer involved).

    python benchmarks/experiments/vae_colour_roundtrip.py [--vae-weights runs/.../vae_decoder_final.pt --out DIR/roundtrip]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from videocache.pipelines.loader import load_pipeline
from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import render_clip, split_captions
from videocache.pipelines.reference.shared import load_vae_weights, vae_round_trip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=9, help="training captions per (colour, background)")
    p.add_argument("--seeds", type=int, default=4, help="rendered clips per caption (seeds 0..N-1)")
    p.add_argument("--vae-weights", default=None, help="a decoder checkpoint to measure instead of the shipped one")
    p.add_argument("--out", default=str(Path(__file__).with_name("vae_colour_roundtrip")))
    args = p.parse_args()
    vae = load_pipeline("reference-wan", device="cpu").vae
    if args.vae_weights:
        load_vae_weights(vae, args.vae_weights)
    groups = defaultdict(list)
    for caption in split_captions()[0]:
        groups[(caption.colour, caption.background)].append(caption)
    rows = []
    for (colour, background), captions in tqdm(sorted(groups.items()), desc="colour x background"):
        videos = wrong_video = wrong_first = 0
        for caption in captions[: args.captions]:
            for seed in range(args.seeds):
                frames = vae_round_trip(vae, render_clip(caption, seed=seed).video)
                wrong = [c != colour for c in check_video(frames).frame_colours]
                videos += 1
                wrong_video += any(wrong)
                wrong_first += wrong[0]
        rows.append({"colour": colour, "background": background, "videos": videos,
                     "videos_with_a_wrong_frame": wrong_video, "first_frame_wrong": wrong_first})
    result = {"command": "python " + shlex.join(sys.argv), "captions": args.captions, "seeds": args.seeds,
              "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Per-frame colour through the shared reference VAE alone (encode -> decode of rendered clips)",
        "",
        f"`{result['command']}`: up to {args.captions} training captions per shape colour and background, seeds "
        f"0-{args.seeds - 1}; the checker's colour per frame against the caption's.",
        "",
        "| colour | background | videos | with a wrong frame | first frame wrong |",
        "|---|---|---:|---:|---:|",
        *(f"| {r['colour']} | {r['background']} | {r['videos']} | {r['videos_with_a_wrong_frame']} | "
          f"{r['first_frame_wrong']} |" for r in rows),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
