"""`--attention-backend`: diffusers' attention dispatch chosen, checked and recorded by generate/compare/profile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import DiffusionPipeline
from diffusers.models import attention_dispatch

from videocache.cli import main
from videocache.eval_vbench.comparison.run_store import read_json
from videocache.pipelines.attention_backend import (
    NEEDS_BF16,
    NEEDS_CUDA,
    NEEDS_DEVICE,
    NEEDS_HALF,
    NEEDS_HALF_ON_CUDA,
    AttentionBackendError,
    attention_backend_of,
    backend_names,
    check_attention_backend,
    set_attention_backend,
)

from tests.conftest import requires_reference

PROMPT = "a red circle moving left on a black background"


@pytest.fixture(autouse=True)
def restore_active_backend():
    """Setting a backend also sets diffusers' process-wide default (as diffusers does): undo it per test."""
    registry = attention_dispatch._AttentionBackendRegistry
    before = registry._active_backend
    yield
    registry.set_active_backend(before)


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("videocache: error: ") and err.count("\n") == 1, err
    return err


def test_names_are_diffusers_names():
    names = backend_names()
    assert names[:4] == ["native", "flash", "sage", "xformers"]
    assert set(names) == {b.value for b in attention_dispatch.AttentionBackendName}
    for table in (NEEDS_CUDA, NEEDS_HALF, NEEDS_HALF_ON_CUDA, NEEDS_BF16, set(NEEDS_DEVICE)):
        assert table <= set(names), table - set(names)  # a diffusers rename must not go unnoticed
    assert check_attention_backend("Native", "cpu") == "native"
    assert check_attention_backend(None, "cpu") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--prompt", PROMPT, "--device", "cpu"],
        ["profile", "--budget", "0.5", "--device", "cpu"],
        ["compare", "--device", "cpu"],
    ],
)
def test_unknown_backend_is_one_line_before_loading(argv, tmp_path, capsys, no_model_loading):
    extra = {"generate": ["--out", str(tmp_path / "v.mp4")], "profile": ["--out", str(tmp_path / "p.yaml")]}
    if argv[0] == "compare":
        (tmp_path / "p.txt").write_text(PROMPT + "\n")
        extra["compare"] = ["--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "cmp")]
    assert main([*argv, *extra[argv[0]], "--attention-backend", "flashy"]) == 2
    err = _one_line_error(capsys)
    assert "unknown attention backend 'flashy'; valid names: native, flash, sage, xformers" in err
    assert not any(tmp_path.glob("cmp")) and not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("backend, fragment", [("xformers", "xformers has no CPU kernels"),
                                               ("flash", "flash-attn has CUDA kernels only")])
@pytest.mark.parametrize("installed", [False, True], ids=["missing", "installed"])
def test_cuda_only_backend_on_cpu_is_one_line(backend, fragment, installed, monkeypatch, tmp_path, capsys,
                                              no_model_loading):
    """The package is missing on this machine; `installed` pretends it is there: the CPU still refuses."""
    flag = {"xformers": "_CAN_USE_XFORMERS_ATTN", "flash": "_CAN_USE_FLASH_ATTN"}[backend]
    monkeypatch.setattr(attention_dispatch, flag, installed)
    argv = ["generate", "--prompt", PROMPT, "--device", "cpu", "--out", str(tmp_path / "v.mp4")]
    assert main([*argv, "--attention-backend", backend]) == 2
    err = _one_line_error(capsys)
    assert f"attention backend '{backend}' needs a CUDA device ({fragment}), not cpu" in err
    assert ("it also needs its package: pip install" in err) is not installed
    if backend == "xformers" and not installed:
        assert "pip install 'videocache[xformers]'" in err


def test_missing_package_on_cuda_says_what_to_install(monkeypatch):
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_SAGE_ATTN", False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(AttentionBackendError, match=r"'sage' is not installed: pip install 'sageattention>="):
        check_attention_backend("sage", "cuda", "bfloat16")


def test_half_precision_kernels_need_a_half_dtype(monkeypatch):
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(AttentionBackendError, match=r"needs bfloat16 or float16 weights, not float32 \(--dtype bfloat16\)"):
        check_attention_backend("flash", "cuda", None)  # diffusers loads float32 without --dtype
    assert check_attention_backend("flash", "cuda:0", "bfloat16") == "flash"


def test_a_kernel_that_fails_its_test_call_is_refused_and_undone(tiny_random_pipe, monkeypatch):
    """Past the static checks (here: pretend xformers were installed and ran on CPU) the tiny test call
    fails; the error is one line and the processors keep their previous backend."""
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_XFORMERS_ATTN", True)
    monkeypatch.setattr("videocache.pipelines.attention_backend.NEEDS_CUDA", frozenset())
    set_attention_backend(tiny_random_pipe, "_native_math")
    with pytest.raises(AttentionBackendError, match=r"^attention backend 'xformers' cannot run on cpu/float32: ") as info:
        set_attention_backend(tiny_random_pipe, "xformers")
    assert "\n" not in str(info.value)
    assert attention_backend_of(tiny_random_pipe) == "_native_math"
    assert attention_dispatch._AttentionBackendRegistry._active_backend.value == "_native_math"


@requires_reference
def test_native_end_to_end_equals_the_default(tmp_path, monkeypatch):
    """`generate --attention-backend native` on the reference pipeline: summary records it, and the video
    is bit-identical to the default run (diffusers' default is native: the same SDPA call)."""
    import videocache.video_io

    written = {}
    monkeypatch.setattr(videocache.video_io, "write_video", lambda path, frames, fps: written.__setitem__(str(path), frames))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    summaries = {}
    for name, extra in (("default", []), ("native", ["--attention-backend", "native"])):
        summary = tmp_path / f"{name}.json"
        argv = ["generate", "--prompt", PROMPT, "--steps", "6", "--device", "cpu", "--out", str(tmp_path / f"{name}.mp4"),
                "--summary", str(summary), "--no-progress", *extra]
        assert main(argv) == 0
        summaries[name] = json.loads(summary.read_text())
    assert summaries["default"]["attention_backend"] == "native"  # diffusers' default, recorded as such
    assert summaries["native"]["attention_backend"] == "native"
    default, native = written[str(tmp_path / "default.mp4")], written[str(tmp_path / "native.mp4")]
    assert default.shape == (17, 64, 64, 3)
    np.testing.assert_array_equal(native, default)


def test_compare_runs_every_worker_on_the_backend_and_records_it(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
            "--steps", "2", "--frames", "1", "--height", "16", "--width", "16", "--no-progress"]
    assert main([*argv, "--attention-backend", "_native_math"]) == 0, capsys.readouterr().err
    assert read_json(out / "settings.json")["attention_backend"] == "_native_math"
    assert read_json(out / "report.json")["settings"]["attention_backend"] == "_native_math"
    assert "attention backend _native_math" in (out / "report.md").read_text()
    [record] = list((out / "runs").rglob("*.json"))
    assert read_json(record)["attention_backend"] == "_native_math"  # what the worker's transformer ran with
    capsys.readouterr()
    # resuming with another backend is refused (the timings and videos would not be comparable)
    assert main(argv) == 2
    assert "attention_backend: '_native_math' -> None" in _one_line_error(capsys)


def test_profile_calibrates_on_the_backend_and_records_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The calibration itself is stubbed (test_calibration runs it): the pipeline it gets runs on the backend."""
    import types

    import videocache.eval_vbench.calibration.runs as calibration

    seen = {}

    def fake_calibrate(pipe, name, prompts, budgets, settings, **kwargs):
        seen.update(backend=attention_backend_of(pipe), settings=settings)
        profile = types.SimpleNamespace(name=name, fgbg=None, presets={"p": {}},
                                        save=lambda path: path.write_text("stub\n"))
        return profile, {"seconds": 0.0}

    monkeypatch.setattr(calibration, "calibrate", fake_calibrate)
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "tiny.yaml"
    assert main(["profile", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--budget", "0.5",
                 "--out", str(out), "--device", "cpu", "--attention-backend", "_native_math", "--no-progress", "--no-guard"]) == 0
    assert seen["backend"] == "_native_math" and seen["settings"].attention_backend == "_native_math"
    assert json.loads(out.with_suffix(".json").read_text())["attention_backend"] == "_native_math"
    capsys.readouterr()
