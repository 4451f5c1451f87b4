"""Runs VBench's own evaluation inside the VBench virtual environment; run as a script by that environment's
python, never imported by videocache (it needs only the standard library and the `vbench` package).

    python vbench_runner.py REQUEST.json RESULT.json

REQUEST: {"videos_path", "dimensions", "mode" ("vbench_standard" | "custom_input"), "output_path", "name",
"device", "full_info" (VBench_full_info.json, standard mode)}. Every dimension is evaluated on its own with
`VBench(...).evaluate(..., dimension_list=[dimension])`, so one that fails leaves the others. Before that,
VBench's `init_submodules` runs with every download it would start (wget / git clone / urlretrieve) turned
into a one-line error naming the checkpoint and the command that fetches it: nothing is downloaded here.

RESULT: {"vbench_version", "scores": {dim: float}, "per_video": {dim: [...]}, "errors": {dim: "one line"}}.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time


class MissingCheckpoint(RuntimeError):
    pass


def _refuse_downloads() -> None:
    """Make every download VBench would start raise MissingCheckpoint with the command that would fetch it."""

    def run(cmd, *args, **kwargs):
        words = [str(c) for c in (cmd if isinstance(cmd, (list, tuple)) else shlex.split(str(cmd)))]
        if words and words[0] in ("wget", "git", "curl", "unzip", "rm"):
            target = next((w for w in words[1:] if w.startswith(("http://", "https://"))), " ".join(words))
            dest = words[words.index("-P") + 1] if "-P" in words else None
            where = f" into {dest}" if dest else ""
            raise MissingCheckpoint(f"missing checkpoint {target.rsplit('/', 1)[-1]}{where}; fetch it with: {shlex.join(words)}")
        return _real_run(cmd, *args, **kwargs)

    def urlretrieve(url, filename=None, *args, **kwargs):
        raise MissingCheckpoint(f"missing checkpoint {filename}; fetch it with: wget {url} -O {filename}")

    _real_run = subprocess.run
    subprocess.run = run
    import urllib.request

    urllib.request.urlretrieve = urlretrieve


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    head = text[0] if text else ""
    return head if isinstance(exc, MissingCheckpoint) else f"{type(exc).__name__}: {head}"


def main(request_path: str, result_path: str) -> int:
    request = json.loads(open(request_path).read())
    _refuse_downloads()
    import importlib.metadata

    import vbench
    from vbench import VBench
    from vbench.utils import CACHE_DIR, init_submodules

    for name in ("aesthetic_quality",):  # modules that call urlretrieve / subprocess by their own names
        try:
            module = __import__(f"vbench.{name}", fromlist=["x"])
            import urllib.request

            module.urlretrieve = urllib.request.urlretrieve
            module.subprocess = subprocess
        except Exception:
            pass
    result = {
        "vbench_version": importlib.metadata.version("vbench"),
        "vbench_path": os.path.dirname(vbench.__file__),
        "cache_dir": CACHE_DIR,
        "scores": {},
        "per_video": {},
        "errors": {},
        "seconds": {},
    }
    bench = VBench(request.get("device", "cpu"), request.get("full_info", ""), request["output_path"])
    for dim in request["dimensions"]:
        start = time.perf_counter()
        try:
            init_submodules([dim], local=True, read_frame=False)  # raises MissingCheckpoint instead of downloading
            name = f"{request['name']}_{dim}"
            bench.evaluate(
                videos_path=request["videos_path"], name=name, dimension_list=[dim], local=True,
                mode=request.get("mode", "custom_input"),
            )
            with open(os.path.join(request["output_path"], f"{name}_eval_results.json")) as f:
                score, per_video = json.load(f)[dim]
            result["scores"][dim] = float(score)
            result["per_video"][dim] = per_video
        except BaseException as exc:  # noqa: BLE001 - one dimension failing must not stop the others
            if isinstance(exc, KeyboardInterrupt):
                raise
            result["errors"][dim] = _one_line(exc)
        result["seconds"][dim] = time.perf_counter() - start
    tmp = f"{result_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
