"""benchmarks/gpu_scale.py: its smoke mode (tiny model, CPU) runs the same code as the GPU benchmark and
writes sane results; the model it builds has the dtypes from_pretrained(torch_dtype=bfloat16) gives."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from .conftest import requires_reference

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_scale.py"


@functools.cache
def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_smoke(out: Path, *extra: str, timeout: float) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return json.loads(out.with_suffix(".json").read_text())


def check_rows(result: dict, names: set[str]) -> dict[str, dict]:
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == names
    for name, row in rows.items():
        assert "error" not in row, (name, row["error"])
        fraction = row["computed_fraction"]
        if name == "compiled-uncached":
            assert fraction is None  # no hooks inside a compiled run
        else:
            assert 0 < fraction <= 1, (name, fraction)
        assert row["transformer_s"] > 0 and row["speedup"] > 0, name
        assert row["transformer_calls"] == 2 * result["setup"]["steps"], name  # CFG: two calls a step
        assert row["peak_mem_bytes"] > 0 and row["cache_peak_bytes"] >= 0 and row["cache_peak_host_bytes"] >= 0
        if row["group"] == "compiled":
            assert row["recompiles_after_warmup"] == 0, name
            assert row["compile_backend"] == "eager"
        if row.get("fraction_source") == "engine.stats":  # the hooks count what the engine says it ran
            assert row.get("hook_fraction", fraction) == pytest.approx(fraction, abs=1e-3), name
    assert rows["uncached"]["computed_fraction"] == 1.0
    assert len(rows["uncached"]["runs_s"]) == result["setup"]["uncached_repeats"]
    for name, row in rows.items():
        if name.startswith(("vc-", "compiled-vc-")):
            assert row["cache_peak_bytes"] > 0 and row["info"]["profile"] == "wan2.1-t2v-1.3b"
            assert row["computed_fraction"] < 1 and row["fallbacks"] == 0
    return rows


@requires_reference
def test_smoke_default_rows(tmp_path):
    result = run_smoke(tmp_path / "smoke", timeout=240)
    env = result["environment"]  # benchmarks/common.py's record
    assert result["smoke"] and result["device"] and env["torch"] == torch.__version__ and "git_commit" in env
    assert env["diffusers"] and result["command"].startswith("python benchmarks/gpu_scale.py --smoke")
    setup = result["setup"]
    assert (setup["blocks"], setup["hidden"], setup["video_tokens"], setup["steps"]) == (30, 64, 32, 25)
    rows = check_rows(result, {"uncached", "vc-fast", "vc-fast-blockwise", "taylorseer-2", "compiled-uncached",
                               "compiled-vc-fast"})
    assert rows["vc-fast"]["computed_fraction"] == rows["vc-fast-blockwise"]["computed_fraction"]
    assert rows["vc-fast"]["info"]["options"]["fuse_skipped_steps"] is True
    assert rows["vc-fast-blockwise"]["info"]["options"]["fuse_skipped_steps"] is False
    assert rows["compiled-vc-fast"]["engine_compiled"] is True
    assert rows["taylorseer-2"]["fraction_source"] == "hooks"
    assert result["skipped"] == [] and result["budget_s"] is None
    md = (tmp_path / "smoke.md").read_text()
    assert "SMOKE" in md and md.count("\n| ") == 1 + len(rows)


@requires_reference
@pytest.mark.slow
def test_smoke_every_row_and_merge(tmp_path):
    out = tmp_path / "all"
    module = load_script()
    eager = run_smoke(out, "--rows", "eager", timeout=400)
    check_rows(eager, set(module.GROUPS["eager"]))
    rows = {r["name"]: r for r in eager["rows"]}
    assert len(rows["magcache"]["info"]["mag_ratios"]) == eager["setup"]["steps"]
    assert rows["magcache"]["calibration_s"] > 0
    assert rows["vc-fast-blockwise-int8-offload"]["info"]["options"]["cache_dtype"] == "int8"
    merged = run_smoke(out, "--rows", "compiled", "--merge", timeout=400)  # adds to the same files
    check_rows(merged, set(module.GROUPS["all"]))
    assert {r["name"]: r for r in merged["rows"]}["uncached"] == rows["uncached"]


def test_model_dtypes_match_from_pretrained(tmp_path):
    """The random model is cast as from_pretrained(torch_dtype=bfloat16) loads one: the modules diffusers
    keeps in float32 (time embedder, scale-shift tables, norms, RoPE) stay float32."""
    module = load_script()
    size = dataclasses.replace(module.SMOKE, blocks=2, dtype=torch.float32)
    reference = module.wan_transformer(size, "cpu")
    reference.save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    ours = module.cast_keeping_fp32_modules(module.wan_transformer(size, "cpu"), torch.bfloat16)
    theirs = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    mine = {**dict(ours.named_parameters()), **dict(ours.named_buffers())}
    assert mine.keys() == theirs.keys()
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    kept = {k for k, v in mine.items() if v.dtype == torch.float32}
    assert any("time_embedder" in k for k in kept) and any(k.startswith("rope.") for k in kept)
    assert ours.dtype == torch.bfloat16


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--rows", "nope"], "unknown row 'nope'"),
    (["--smoke", "--uncached-repeats", "-1"], "--uncached-repeats"),
    (["--device", "cpu"], "needs a CUDA device"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    module = load_script()
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videocache: error: ") and message in err and "\n" not in err


@requires_reference
def test_budget_skips_rows_but_keeps_the_last_uncached_run(tmp_path):
    result = run_smoke(tmp_path / "budget", "--rows", "vc-fast,vc-slow", "--budget-s", "0.1", timeout=240)
    assert [r["name"] for r in result["rows"]] == ["uncached"]
    assert len(result["rows"][0]["runs_s"]) == 2  # before and after, although nothing ran between
    assert [s["row"] for s in result["skipped"]] == ["vc-fast", "vc-slow"]
    assert result["rerun_skipped"].endswith("--rows vc-fast,vc-slow --merge")
    assert "--budget-s" not in result["rerun_skipped"]
    assert "Skipped to stay within the time budget" in (tmp_path / "budget.md").read_text()
