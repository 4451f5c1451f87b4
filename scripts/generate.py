"""Generate videos, optionally cached, under `accelerate launch` (or plain `python`).

One prompt (--prompt) or a prompt list (--prompts FILE, one per line). With several processes and no
parallel flag the list is split across ranks (data parallel). With --ulysses N, --ring M and/or
--cfg-parallel all ranks generate every video together (N x M x 2 processes with all three): the ranks of
a guidance branch share its tokens, the two branches run on the two halves of the world; every rank uses
the same seed, and only rank 0 prints and writes. A parallel configuration that cannot run is a one-line
error before any model is loaded.

    accelerate launch scripts/generate.py --prompt "a red circle moving left on a black background" \
        --profile reference-wan --preset fast --out out.mp4 --summary out.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 scripts/generate.py \
        --prompts prompts.txt --out-dir videos/ --profile reference-wan
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 scripts/generate.py \
        --ulysses 2 --profile reference-wan --preset fast --prompt "..." --out out.mp4
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 scripts/generate.py \
        --ring 2 --prompt "..." --out out.mp4
    accelerate launch --config_file distributed/accelerate_4proc.yaml scripts/generate.py \
        --ulysses 2 --cfg-parallel --prompt "..." --out out.mp4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from videocache.cli import USER_ERRORS, add_generation_arguments, run_generation
from videocache.distributed.checks import ParallelSettings
from videocache.distributed.generation import settings_from_args
from videocache.distributed.state import exit_processes, leave_on_error, process_state
from videocache.pipelines.generation import read_prompts


def _job(args: argparse.Namespace, prompt: str, out_dir: Path, index: int, state) -> argparse.Namespace:
    job = argparse.Namespace(**vars(args))
    job.prompt = prompt
    job.out = str(out_dir / f"{index:04d}.mp4")
    job.summary = str(out_dir / f"{index:04d}.json")
    job.no_progress = job.no_progress or not state.is_main_process
    return job


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
    parallel = settings_from_args(args) != ParallelSettings()  # all ranks generate each video together
    try:
        code = _run(args, state, parallel)
    except USER_ERRORS as exc:
        # every rank says what stopped it, the others with their rank: the ranks share their inputs, hence mostly
        # their errors, but an error of one rank alone would otherwise go unsaid while rank 0 waits for it
        rank = "" if state.is_main_process else f" (rank {state.process_index})"
        print(f"generate.py: error{rank}: {str(exc).splitlines()[0]}", file=sys.stderr)
        leave_on_error(state)
        return 2
    exit_processes(state, code)  # several processes: they end here
    return code


def _run(args: argparse.Namespace, state, parallel: bool) -> int:
    """One prompt, or a prompt list split over the ranks (or shared by them under parallelism)."""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give exactly one of --prompt or --prompts")
    if args.prompt is not None:
        if not state.is_main_process and not parallel:  # one prompt: rank 0 generates, the others idle
            return 0
        summary = run_generation(args)
        print(json.dumps({k: summary[k] for k in ("video", "wall_s", "transformer_s", "computed_fraction")}))
        return 0
    prompts = read_prompts(args.prompts)
    out_dir = Path(args.out_dir)
    if parallel:
        for index, prompt in enumerate(prompts):
            run_generation(_job(args, prompt, out_dir, index, state))
        if state.is_main_process:
            print(f"wrote {len(prompts)} videos to {out_dir} with {state.num_processes} processes ({settings_from_args(args).flags()})")
        return 0
    with state.split_between_processes(list(enumerate(prompts))) as mine:
        for index, prompt in mine:
            run_generation(_job(args, prompt, out_dir, index, state))
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"wrote {len(prompts)} videos to {out_dir} with {state.num_processes} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
