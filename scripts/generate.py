"""Generate videos, optionally cached, under `accelerate launch` (or plain `python`).

One prompt (--prompt) or a prompt list (--prompts FILE, one per line): with several processes the list
is split across ranks (data parallel), every rank uses the same seed for the same prompt, and only
rank 0 prints.

    accelerate launch scripts/generate.py --prompt "a red circle moving left on a black background" \
        --profile reference-wan --preset fast --out out.mp4 --summary out.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 scripts/generate.py \
        --prompts prompts.txt --out-dir videos/ --profile reference-wan
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from videocache.cli import USER_ERRORS, add_generation_arguments, run_generation
from videocache.distributed.state import process_state
from videocache.pipelines.generation import read_prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_arguments(parser)
    parser.set_defaults(prompt=None)
    for action in parser._actions:
        if action.dest == "prompt":
            action.required = False
    parser.add_argument("--prompts", default=None, help="file with one prompt per line (data parallel over ranks)")
    parser.add_argument("--out-dir", default="videos", help="with --prompts: folder for the videos and summaries")
    args = parser.parse_args(argv)
    state = process_state()
    try:
        if (args.prompt is None) == (args.prompts is None):
            raise ValueError("give exactly one of --prompt or --prompts")
        if args.prompt is not None:
            if not state.is_main_process:  # one prompt: rank 0 generates, the others have nothing to do
                return 0
            summary = run_generation(args)
            print(json.dumps({k: summary[k] for k in ("video", "wall_s", "transformer_s", "computed_fraction")}))
            return 0
        prompts = read_prompts(args.prompts)
        out_dir = Path(args.out_dir)
        with state.split_between_processes(list(enumerate(prompts))) as mine:
            for index, prompt in mine:
                job = argparse.Namespace(**vars(args))
                job.prompt = prompt
                job.out = str(out_dir / f"{index:04d}.mp4")
                job.summary = str(out_dir / f"{index:04d}.json")
                job.no_progress = job.no_progress or not state.is_main_process
                run_generation(job)
        state.wait_for_everyone()
        if state.is_main_process:
            print(f"wrote {len(prompts)} videos to {out_dir} with {state.num_processes} process(es)")
        return 0
    except USER_ERRORS as exc:
        print(f"generate.py: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
