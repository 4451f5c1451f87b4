"""Profiles are package data: a wheel carries them and finds them by name; user folders come first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import videocache.profile as vp
from videocache.profile import ProfileError, available_profiles, find_profile, load_profile, profile_dirs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_YAML = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))
# what the wheel is built from: pyproject.toml's package-dir folders, and the files it names
SOURCES = ("pyproject.toml", "README.md", "videocache", "pipelines", "distributed", "eval_vbench", "profiles")


# -- lookup order: $VIDEOCACHE_PROFILES, the user folder, the shipped profiles ------------------------
@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """A clean environment: no $VIDEOCACHE_PROFILES, and a user config folder under tmp_path."""
    monkeypatch.delenv(vp.PROFILES_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def write_profile(folder: Path, name: str, file_name: str | None = None, **metadata) -> Path:
    data = yaml.safe_load((vp.PROFILES_DIR / "reference-wan.yaml").read_text())
    data["name"], data["metadata"] = name, {**data.get("metadata", {}), **metadata}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (file_name or f"{name}.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_user_folder_respects_xdg_config_home_and_home(dirs, monkeypatch):
    assert vp.user_profiles_dir() == dirs / "config" / "videocache" / "profiles"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(dirs / "home"))
    assert vp.user_profiles_dir() == dirs / "home" / ".config" / "videocache" / "profiles"


def test_default_search_path_is_user_folder_then_shipped(dirs):
    assert profile_dirs() == [vp.user_profiles_dir(), vp.PROFILES_DIR]
    assert (vp.PROFILES_DIR / "reference-wan.yaml").is_file()
    assert set(available_profiles()) >= {Path(n).stem for n in SHIPPED_YAML}


def test_user_folder_profile_found_by_name(dirs):
    path = write_profile(vp.user_profiles_dir(), "mine")
    assert load_profile("mine").source == str(path)
    assert "mine" in available_profiles() and "reference-wan" in available_profiles()


def test_env_folders_come_first_in_order(dirs, monkeypatch):
    a, b = dirs / "a", dirs / "b"
    write_profile(vp.user_profiles_dir(), "reference-wan", where="user")
    write_profile(b, "reference-wan", where="b")
    write_profile(b, "only-b", where="b")
    monkeypatch.setenv(vp.PROFILES_ENV, os.pathsep.join([str(a), "", str(b)]))  # a is missing: skipped
    assert profile_dirs() == [a, b, vp.user_profiles_dir(), vp.PROFILES_DIR]
    assert load_profile("reference-wan").metadata["where"] == "b"  # env beats the user folder
    assert load_profile("only-b").source == str(b / "only-b.yaml")
    write_profile(a, "reference-wan", where="a")
    assert load_profile("reference-wan").metadata["where"] == "a"  # the first env folder wins
    assert available_profiles().count("reference-wan") == 1 and "only-b" in available_profiles()


def test_user_folder_beats_shipped_and_yml_suffix_works(dirs):
    write_profile(vp.user_profiles_dir(), "reference-wan", file_name="reference-wan.yml", where="user")
    assert find_profile("reference-wan") == vp.user_profiles_dir() / "reference-wan.yml"
    assert load_profile("reference-wan").metadata["where"] == "user"


def test_paths_still_work_and_are_not_looked_up(dirs, monkeypatch):
    path = write_profile(dirs / "elsewhere", "by-path")
    assert load_profile(path).name == "by-path" and load_profile(str(path)).name == "by-path"
    monkeypatch.chdir(dirs / "elsewhere")
    assert load_profile("by-path.yaml").name == "by-path"  # relative path with a suffix
    msg = str(pytest.raises(ProfileError, load_profile, dirs / "missing.yaml").value)
    assert "does not exist" in msg


def test_unknown_name_is_one_line_listing_names_and_folders(dirs, monkeypatch):
    write_profile(dirs / "env", "from-env")
    monkeypatch.setenv(vp.PROFILES_ENV, str(dirs / "env"))
    msg = str(pytest.raises(ProfileError, load_profile, "no-such-profile").value)
    assert "\n" not in msg and "no-such-profile" in msg
    assert "from-env" in msg and "reference-wan" in msg
    for d in (dirs / "env", vp.user_profiles_dir(), vp.PROFILES_DIR):
        assert str(d) in msg
    monkeypatch.delenv(vp.PROFILES_ENV)
    msg = str(pytest.raises(ProfileError, load_profile, "no-such-profile").value)
    assert f"${vp.PROFILES_ENV} (unset)" in msg


# -- the wheel -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the sources (so no build/ or egg-info lands in the repo)."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "-q", "-w", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("videocache-*.whl")
    return whl


def test_wheel_carries_the_profiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert SHIPPED_YAML and "reference-wan.yaml" in SHIPPED_YAML
    for yml in SHIPPED_YAML:
        assert f"videocache/profiles/{yml}" in names, sorted(n for n in names if "profiles" in n)
    assert "videocache/profiles/reference-wan.json" in names  # the calibration report behind it
    assert "videocache/profiles/__init__.py" in names
    assert not any(n.startswith("profiles/") for n in names)  # no top-level `profiles` package


def test_wheel_carries_every_reference_pipeline(wheel):
    """Each shipped reference pipeline's weights, so that `--model reference-...` works after pip install."""
    from videocache.family import known_models

    names = set(zipfile.ZipFile(wheel).namelist())
    for model in known_models():
        folder = f"videocache/pipelines/reference/{model}/"
        assert any(n.startswith(folder + "transformer/") and n.endswith(".safetensors") for n in names), model
        assert folder + "model_index.json" in names, model


def test_wheel_carries_every_eval_module(wheel):
    """eval_vbench's subpackages are listed in pyproject.toml one by one: a missing one would leave the wheel
    without it (scoring/vbench_runner.py is run as a script by the VBench environment)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.relative_to(ROOT / "eval_vbench").as_posix() for p in (ROOT / "eval_vbench").rglob("*.py"))
    assert "scoring/vbench_runner.py" in modules
    assert [m for m in modules if f"videocache/eval_vbench/{m}" not in names] == []


def test_installed_wheel_finds_profiles_and_families_by_name(wheel, tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
           "-q", "--target", str(target), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (vp.PROFILES_ENV, "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), XDG_CONFIG_HOME=str(tmp_path / "config"), PYTHONNOUSERSITE="1")
    code = (
        "import videocache, videocache.profile as vp; from videocache.profile import load_profile; "
        "p = load_profile('reference-wan'); print(p.name); print(p.source); print(videocache.__file__); "
        "print(vp.PROFILES_DIR); print(','.join(vp.available_profiles())); "
        "f = videocache.families(); print(','.join(sorted(f))); print(f['wan'].models['reference-wan'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=outside, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name, source, module, shipped, avail, families, reference = proc.stdout.strip().splitlines()[-7:]
    assert name == "reference-wan"
    installed = target.resolve() / "videocache"
    assert Path(module).resolve().parent == installed  # the installed package, not the source tree
    assert Path(shipped).resolve() == installed / "profiles"
    assert Path(source).resolve() == installed / "profiles" / "reference-wan.yaml"
    assert ROOT not in Path(source).resolve().parents
    assert set(avail.split(",")) >= {Path(n).stem for n in SHIPPED_YAML}
    # the model families come from the wheel's entry points, and their named models from the wheel
    assert families == "hunyuan,opensora,wan"
    assert Path(reference).resolve() == installed / "pipelines" / "reference" / "reference-wan"
