"""The reproduce line in TRAINING.json: built from the recorded arguments it is the shipped one, byte for byte,
and a shipped line parsed by today's command line rebuilds as scripts/train_reference.py did before its stages
moved to videocache.pipelines.reference.training (commit 97e7b1b)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytest

from videocache.pipelines.reference.training.assemble import reproduce_command

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("wan", "hunyuan", "opensora")

# reference-opensora's shipped line ends with a --stages option added by hand (commit 86c5de1: one command that
# also renders the clips); the builder never writes --stages.
ADDED_BY_HAND = {"opensora": " --stages clips,latents,transformer,assemble"}

# What the script at commit 97e7b1b built from each shipped line parsed by its command line: the options added
# since each was recorded appear with their defaults. That script wrote a store_true flag with its value
# (--decoder-weigh-halos False), which argparse does not take back; a switch now appears alone when set, so the
# lines below are the old ones without it.
REBUILT_BEFORE = {
    "wan": "python scripts/train_reference.py --out pipelines/reference/reference-wan --seed 0 --vae-steps 800 "
    "--vae-batch 8 --vae-frames 9 --vae-crop 32 --vae-full-steps 2500 --vae-full-batch 4 --vae-full-schedule-steps "
    "3200 --decoder-steps 1600 --decoder-schedule-steps 2500 --decoder-lr 0.0005 --decoder-fg-weight 4.0 "
    "--decoder-frame0-noise 0.0 --decoder-noise 0.0 --decoder-clean-fraction 0.0 --decoder-frame0-weight 1.0 "
    "--vae-lr 0.001 --vae-kl 0.0001 --clips-per-caption 16 --steps 2300 --batch 256 "
    "--lr 0.001 --steps2 4600 --lr2 0.0005 --ema 0.999 --cfg-dropout 0.1 --ckpt-every 100 --text-encoder "
    "pipelines/reference/reference-wan",
    "hunyuan": "python scripts/train_reference.py --out pipelines/reference/reference-hunyuan --seed 0 --vae-steps "
    "800 --vae-batch 8 --vae-frames 9 --vae-crop 32 --vae-full-steps 1000 --vae-full-batch 4 --decoder-steps 1500 "
    "--decoder-lr 0.0005 --decoder-fg-weight 4.0 --decoder-frame0-noise 0.0 --decoder-noise 0.0 "
    "--decoder-clean-fraction 0.0 --decoder-frame0-weight 1.0 --vae-lr 0.001 --vae-kl "
    "0.0001 --clips-per-caption 16 --steps 11000 --batch 16 --lr 0.001 --steps2 0 --lr2 0.0003 --ema 0.999 "
    "--cfg-dropout 0.1 --ckpt-every 200 --architecture hunyuan --vae pipelines/reference/reference-wan",
    "opensora": "python scripts/train_reference.py --out pipelines/reference/reference-opensora --seed 0 "
    "--vae-steps 800 --vae-batch 8 --vae-frames 9 --vae-crop 32 --vae-full-steps 1000 --vae-full-batch 4 "
    "--decoder-steps 1500 --decoder-lr 0.0005 --decoder-fg-weight 4.0 --decoder-frame0-noise 0.0 --decoder-noise "
    "0.0 --decoder-clean-fraction 0.0 --decoder-frame0-weight 1.0 --vae-lr 0.001 "
    "--vae-kl 0.0001 --clips-per-caption 16 --steps 17000 --batch 32 --lr 0.001 --steps2 9000 --lr2 0.0003 --ema "
    "0.999 --cfg-dropout 0.1 --ckpt-every 200 --architecture opensora --vae pipelines/reference/reference-wan",
}


def shipped_record(architecture: str) -> dict:
    return json.loads((ROOT / "pipelines" / "reference" / f"reference-{architecture}" / "TRAINING.json").read_text())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_recorded_arguments_rebuild_the_shipped_reproduce_line(architecture):
    record = shipped_record(architecture)
    rebuilt = reproduce_command(argparse.Namespace(**record["arguments"]))
    assert rebuilt + ADDED_BY_HAND.get(architecture, "") == record["reproduce"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shipped_reproduce_line_parsed_today_rebuilds_as_before(architecture):
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_reference

    program, script, *argv = shlex.split(shipped_record(architecture)["reproduce"])
    assert (program, script) == ("python", "scripts/train_reference.py")
    args = train_reference.build_parser().parse_args(argv)
    assert args.architecture == architecture
    assert reproduce_command(args) == REBUILT_BEFORE[architecture]


def test_a_switch_in_the_reproduce_line_parses_back():
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_reference

    parser = train_reference.build_parser()
    for argv in (["--out", "x", "--decoder-weigh-halos"], ["--out", "x"]):
        args = parser.parse_args(argv)
        program, script, *again = shlex.split(reproduce_command(args))
        assert vars(parser.parse_args(again)) == vars(args)
