"""`videocache compare`: input checks, resuming, and one end-to-end run in worker processes."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import yaml

from videocache.cli import main
from videocache.eval_vbench.comparison.compare import group_methods, read_prompts
from videocache.eval_vbench.comparison.report import render_markdown
from videocache.eval_vbench.comparison.run_store import Item, RunSettings, RunStore, read_json, write_json
from videocache.eval_vbench.peers import parse_methods
from videocache.profile import PROFILES_DIR

PROMPTS = "# two held-out style prompts\na red circle moving left on a black background\n\na blue square moving up on a white background\n"
SMALL = ["--steps", "6", "--frames", "5", "--height", "32", "--width", "32", "--no-progress"]


def test_read_prompts_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(PROMPTS)
    assert read_prompts(path) == [
        "a red circle moving left on a black background",
        "a blue square moving up on a white background",
    ]
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "missing.txt")


def test_cachedit_methods_get_a_process_each():
    groups = group_methods(
        parse_methods(["cachedit:dbcache:1:0:0.1", "diffusers:pab:2", "cachedit:dbcache:2:0:0.1"])
    )
    assert [(g.name, [x.spec for x in g.methods]) for g in groups] == [
        ("main", ["none", "diffusers:pab:2"]),
        ("cachedit:dbcache:1:0:0.1", ["cachedit:dbcache:1:0:0.1"]),
        ("cachedit:dbcache:2:0:0.1", ["cachedit:dbcache:2:0:0.1"]),
    ]


def test_resuming_with_other_settings_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.check_settings(RunSettings(model="m", steps=25, frames=17, height=64, width=64, guidance_scale=5.0))
    store.check_settings(
        RunSettings(model="m", steps=25, frames=17, height=64, width=64, guidance_scale=5.0, fps=8)
    )
    with pytest.raises(ValueError, match=r"other settings \(steps: 25 -> 6\); pass a new --out"):
        store.check_settings(
            RunSettings(model="m", steps=6, frames=17, height=64, width=64, guidance_scale=5.0)
        )


def test_a_recalibrated_profile_is_rerun_on_resume(tmp_path):
    """A record of `videocache:FILE:PRESET` made before FILE changed must not be reused."""
    profile = tmp_path / "p.yaml"
    data = yaml.safe_load((PROFILES_DIR / "reference-wan.yaml").read_text())
    profile.write_text(yaml.safe_dump(data))
    [method] = parse_methods([f"videocache:{profile}:fast"])[1:]
    store, item = RunStore(tmp_path / "cmp"), Item(prompt="a red circle moving left on a black background", seed=0)
    write_json(store.record_path(method.spec, item), {"config_digest": method.config_digest()})
    assert store.has_record(method.spec, item, method.config_digest())
    data["presets"]["fast"]["final_steps"] = 2
    profile.write_text(yaml.safe_dump(data))
    assert not store.has_record(method.spec, item, method.config_digest())


def test_bad_settings_are_one_line():
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        RunSettings(model="m", steps=25, frames=17, height=64, width=64, guidance_scale=5.0, repeats=0)


@pytest.mark.parametrize(
    "methods, fragment",
    [
        (["diffusers:teacache:0.1"], "unknown method spec 'diffusers:teacache:0.1'; valid forms: none,"),
        (["cachedit:dbcache:1:0"], "expected cachedit:dbcache:Fn:Bn:THRESHOLD"),
    ],
)
def test_bad_method_spec_is_a_one_line_error_before_anything_runs(tmp_path, capsys, methods, fragment):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--model",
            "reference-wan",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--methods",
            *methods,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("videocache: error: ") and fragment in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_launched_processes_without_degrees_error_once_from_rank_0(tmp_path, capsys, monkeypatch, rank):
    """The launcher's RANK / WORLD_SIZE (distributed.state.launch_rank, launched_world) are read without a
    process group: rank 0 prints the one-line error, the others exit 2 silently."""
    from videocache.distributed.state import launch_local_rank, launch_rank, launched_world

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert (launch_rank(), launched_world(), launch_local_rank()) == (rank, 2, None)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPTS)
    argv = ["compare", "--model", "reference-wan", "--prompts", str(prompts), "--out", str(tmp_path / "out")]
    if rank == 0:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("videocache: error: videocache compare was launched as 2 processes without")
        assert err.count("\n") == 1
    else:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    assert not (tmp_path / "out").exists()


def test_missing_prompts_file_is_a_one_line_error(tmp_path, capsys):
    rc = main(["compare", "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "prompts file" in capsys.readouterr().err


def test_report_prints_inf_for_identical_videos():
    report = {
        "settings": {
            "model": "m",
            "steps": 6,
            "frames": 5,
            "height": 32,
            "width": 32,
            "guidance_scale": 5.0,
            "repeats": 1,
            "device": None,
            "dtype": None,
        },
        "prompts": ["p"],
        "seeds": [0],
        "timing": "t",
        "methods": [
            {
                "method": "none",
                "family": "none",
                "label": "none",
                "items": 1,
                "items_expected": 1,
                "computed_fraction": 1.0,
                "transformer_speedup": 1.0,
                "wall_speedup": 1.0,
                "psnr": math.inf,
                "ssim": 1.0,
                "cache_peak_bytes": 0,
            }
        ],
    }
    assert "| `none` | 1.000 | 1.00x | 1.00x | inf | 1.0000 | 0 B |" in render_markdown(report)


@pytest.mark.skipif(
    importlib.util.find_spec("cache_dit") is None,
    reason="cache-dit not installed (pip install cache-dit==1.5.3)",
)
def test_compare_end_to_end_with_cachedit_in_its_own_process(tiny_random_pipe, tmp_path, capsys):
    model = tmp_path / "tiny-wan"
    tiny_random_pipe.save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--methods",
        "diffusers:fbcache:0.2",
        "cachedit:dbcache:1:0:0.5",
        *SMALL,
    ]
    assert main(argv) == 0, capsys.readouterr().err
    for name in ("report.json", "report.md", "pareto.png", "settings.json"):
        assert (out / name).is_file(), name
    raw = json.loads((out / "report.json").read_text())
    assert raw["methods"][0]["psnr"] == "inf"  # strict JSON: infinity is written as the string "inf"
    entries = {e["method"]: e for e in read_json(out / "report.json")["methods"]}
    assert list(entries) == ["none", "diffusers:fbcache:0.2", "cachedit:dbcache:1:0:0.5"]
    none = entries["none"]
    assert none["computed_fraction"] == 1.0 and none["psnr"] == math.inf and none["ssim"] == 1.0
    for spec in ("diffusers:fbcache:0.2", "cachedit:dbcache:1:0:0.5"):
        e = entries[spec]
        assert e["items"] == 2 and len(e["rows"]) == 2
        assert 0.0 < e["computed_fraction"] < 1.0, spec  # measured from executed modules
        assert math.isfinite(e["psnr"]) and 0.0 < e["ssim"] < 1.0
        assert e["transformer_speedup"] > 0 and e["cache_peak_bytes"] > 0
        assert e["baseline_matches_reference"], spec  # every process produced the same uncached video
    cachedit_record = read_json(next((out / "runs").glob("cachedit_dbcache*/*.json")))
    assert cachedit_record["process"] == "cachedit:dbcache:1:0:0.5"
    md = (out / "report.md").read_text()
    assert "| `none` | 1.000 |" in md and "| inf |" in md
    assert len(list((out / "runs").rglob("*.json"))) == 6
    assert not (out / "videos").exists()  # only with --save-videos
    capsys.readouterr()
    # a rerun finds every record and runs nothing
    assert main(argv) == 0
    assert "ran 0 runs (6 already done)" in capsys.readouterr().out
