"""The separate virtual environment that runs the real `vbench` package.

vbench 0.1.5 pins transformers==4.33.2, numpy<2 and timm<=1.0.12, which cannot share an environment with
diffusers 0.42, so `videocache eval` creates (once) and reuses a virtual environment of its own:

    python -m videocache.eval_vbench.scoring.vbench_env create  # or: videocache eval ... (creates it when absent)

Where: `--vbench-venv DIR`, else `$VIDEOCACHE_VBENCH_VENV`, else `~/.cache/videocache/vbench-venv`. torch is
installed first and pinned together with a matching torchvision (`$VIDEOCACHE_VBENCH_TORCH`, default
`torch==2.14.1 torchvision==0.29.1`: vbench needs torchvision, and the registry's torchvision builds for
torch 2.13 are CUDA-linked and break on the CPU wheel; pinning both keeps pip from swapping torch under
vbench), then `vbench==0.1.5` with its own pins. Scoring calls VBench's own `VBench.evaluate` through
`vbench_runner.py` run by that environment's python, exchanging JSON. Model weights: VBench fetches them on
first use into `$VBENCH_CACHE_DIR` (default `~/.cache/vbench`); here nothing is downloaded while scoring, a
dimension whose checkpoint is absent gets a one-line error saying how to fetch it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VENV_ENV = "VIDEOCACHE_VBENCH_VENV"
TORCH_ENV = "VIDEOCACHE_VBENCH_TORCH"
VBENCH_REQUIREMENT = "vbench==0.1.5"
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
RUNNER = Path(__file__).with_name("vbench_runner.py")


class VBenchUnavailable(RuntimeError):
    """The VBench environment is missing or broken (one line, says what to run)."""


def venv_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser()
    return Path.home() / ".cache" / "videocache" / "vbench-venv"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def create_command(venv: Path) -> str:
    return f"python -m videocache.eval_vbench.scoring.vbench_env create --venv {shlex.quote(str(venv))}"


def install_steps(venv: Path, torch_spec: str | None = None) -> list[list[str]]:
    """The commands that create the environment: venv, torch (pinned) first, then vbench."""
    py = str(venv_python(venv))
    torch_spec = torch_spec or os.environ.get(TORCH_ENV) or DEFAULT_TORCH
    return [
        [sys.executable, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "--quiet", *shlex.split(torch_spec)],
        [py, "-m", "pip", "install", "--quiet", *shlex.split(torch_spec), VBENCH_REQUIREMENT],
    ]


def create(venv: Path, torch_spec: str | None = None, log=print) -> Path:
    """Create the environment (several GB, minutes); reused when it already imports vbench."""
    if is_ready(venv):
        log(f"VBench environment {venv} is ready")
        return venv
    for step in install_steps(venv, torch_spec):
        log("+ " + shlex.join(step))
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise VBenchUnavailable(f"creating the VBench environment failed at `{shlex.join(step)}`: {tail[0]}")
    if not is_ready(venv):
        raise VBenchUnavailable(f"{venv} was created but does not import vbench; delete it and run {create_command(venv)}")
    return venv


def is_ready(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.is_file():
        return False
    done = subprocess.run([str(py), "-c", "import importlib.util as u; assert u.find_spec('vbench')"], capture_output=True)
    return done.returncode == 0


@dataclass(frozen=True)
class VBenchPackage:
    venv: Path
    version: str
    package_dir: Path

    @property
    def full_info(self) -> Path:
        """VBench_full_info.json as installed with the package (the standard prompt suite)."""
        return self.package_dir / "VBench_full_info.json"


def package(venv: Path) -> VBenchPackage:
    """Where vbench is installed in the environment (found without importing it: no torch start-up)."""
    py = venv_python(venv)
    if not py.is_file():
        raise VBenchUnavailable(f"no VBench environment at {venv}; create it with: {create_command(venv)}")
    code = (
        "import importlib.util as u, importlib.metadata as m, json; s = u.find_spec('vbench'); "
        "print(json.dumps({'dir': list(s.submodule_search_locations)[0], 'version': m.version('vbench')}))"
    )
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise VBenchUnavailable(f"{venv} does not hold vbench; delete it and run {create_command(venv)}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return VBenchPackage(venv, info["version"], Path(info["dir"]))


def ensure(venv_override: str | None = None, create_missing: bool = True, log=print) -> VBenchPackage:
    venv = venv_dir(venv_override)
    if not is_ready(venv):
        if not create_missing:
            raise VBenchUnavailable(f"no VBench environment at {venv}; create it with: {create_command(venv)}")
        log(f"creating the VBench environment in {venv} (once; several GB): {create_command(venv)}")
        create(venv, log=log)
    return package(venv)


def evaluate(
    pkg: VBenchPackage,
    videos_path: Path,
    dimensions: list[str],
    mode: str,
    work_dir: Path,
    device: str = "cpu",
    name: str = "videocache",
    log_path: Path | None = None,
) -> dict[str, Any]:
    """VBench's own evaluation of every video in `videos_path`, one dimension at a time, in the VBench
    environment. Returns {"scores", "per_video", "errors", ...} (see vbench_runner.py)."""
    videos_path, work_dir = Path(videos_path).resolve(), Path(work_dir).resolve()  # the runner works in work_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "videos_path": str(videos_path), "dimensions": dimensions, "mode": mode, "output_path": str(work_dir),
        "name": name, "device": device, "full_info": str(pkg.full_info),
    }
    with tempfile.TemporaryDirectory(prefix="vbench-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        log_path = log_path or work_dir / f"{name}.log"
        with open(log_path, "w") as log:
            done = subprocess.run(
                [str(venv_python(pkg.venv)), str(RUNNER), str(req), str(res)], stdout=log, stderr=subprocess.STDOUT,
                cwd=work_dir,
            )
        if done.returncode != 0 or not res.is_file():
            lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
            raise VBenchUnavailable(f"VBench's evaluation failed ({lines[-1] if lines else 'no output'}); see {log_path}")
        return json.loads(res.read_text())


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m videocache.eval_vbench.scoring.vbench_env", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["create", "where", "commands"])
    p.add_argument("--venv", default=None, help=f"default ${VENV_ENV} or ~/.cache/videocache/vbench-venv")
    p.add_argument("--torch", default=None, help=f"torch requirement(s) installed first (default ${TORCH_ENV} or '{DEFAULT_TORCH}')")
    args = p.parse_args(argv)
    venv = venv_dir(args.venv)
    try:
        if args.action == "commands":
            print("\n".join(shlex.join(step) for step in install_steps(venv, args.torch)))
        elif args.action == "create":
            create(venv, args.torch)
            pkg = package(venv)
            print(f"vbench {pkg.version} in {venv} (prompt suite {pkg.full_info})")
        else:
            pkg = package(venv)
            print(f"vbench {pkg.version} in {venv} (prompt suite {pkg.full_info})")
    except VBenchUnavailable as exc:
        print(f"videocache: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
