"""Per-frame colour through the shared reference VAE alone: encode -> decode rendered clips of the training
captions, per shape colour and background, and count the videos in which the checker reads another colour
in some frame (the per-frame gate's question, with no transformer involved).

    python benchmarks/experiments/vae_colour_roundtrip.py [--vae-weights runs/.../vae_decoder_final.pt --out DIR/roundtrip]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from videocache.pipelines.reference.checker import check_video
from videocache.pipelines.reference.data import render_clip, split_captions
from videocache.pipelines.reference.shared import vae_round_trip

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.common
from benchmarks.common import command, environment, markdown_table, reference_pipeline, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", type=int, default=9, help="training captions per (colour, background)")
    p.add_argument("--seeds", type=int, default=4, help="rendered clips per caption (seeds 0..N-1)")
    p.add_argument("--vae-weights", default=None, help="a decoder checkpoint to measure instead of the shipped one")
    p.add_argument("--out", default=str(Path(__file__).with_name("vae_colour_roundtrip")))
    args = p.parse_args()
    vae = reference_pipeline(args.vae_weights).vae
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
    result = {"command": command(__file__), "captions": args.captions, "seeds": args.seeds, "rows": rows,
              "environment": environment()}
    lines = [
        "# Per-frame colour through the shared reference VAE alone (encode -> decode of rendered clips)",
        "",
        f"`{result['command']}`: up to {args.captions} training captions per shape colour and background, seeds "
        f"0-{args.seeds - 1}; the checker's colour per frame against the caption's.",
        "",
        *markdown_table(["colour", "background", "videos", "with a wrong frame", "first frame wrong"],
                        ([r["colour"], r["background"], r["videos"], r["videos_with_a_wrong_frame"],
                          r["first_frame_wrong"]] for r in rows), "llrrr"),
    ]
    json_path, md_path = write_results(args.out, result, lines)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
