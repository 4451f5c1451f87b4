"""What `videocache profile` needs at Wan2.1-T2V-1.3B's size, estimated from the code and a small CPU run.

No GPU: the real calibration (`eval_vbench.calibration.runs.calibrate`, as `videocache profile` calls it) runs on
a random WanTransformer3DModel with Wan2.1-1.3B's 30 blocks but a tiny width (2 heads x 16, FFN 64), in
bfloat16, inside the reference pipeline (its tiny text encoder and VAE) with Wan's scheduler
(UniPCMultistepScheduler, flow sigmas, flow_shift 3.0), 50 steps, CFG 5, 4 prompts, budgets 0.6 / 0.5 / 0.33
with the command's defaults (fgbg from 2 prompts, 1 sensitivity prompt, 3 measured candidates per rule
stage). The fg/bg attention profile runs as a stage of its own (`profile_pipeline`, counted); the
calibration is then given fixed block classes (15 of 30 blocks background) so that the +fgbg stage runs
whatever a random model's attention looks like.

Counted per stage: generations, transformer calls, and per generation the engine's computed fraction and
the most bytes it kept (`cache_peak_bytes`). Every tensor the engine keeps is one (1, tokens, hidden)
component output (model dtype), block-run delta (model dtype) or step sum (float32), so its bytes scale
exactly with tokens x hidden: the peaks are scaled by 32,760 x 1536 / (tokens x hidden of the small run).
The table search runs on the real table size (50 steps x 30 blocks x 3 components), so its host time is
measured as is. The computed fraction of every generation is kept (GPU time scales with it): recording and
perturbation tables are counted with the FLOPs of one real-size call (the Wan adapter's formulas at 32,760
tokens); a measured candidate as the engine counted it (the search chose it within [budget - 0.06, budget]
by the small model's FLOP shares, as the real calibration chooses its own by the real ones).

`--part memory` (seconds): weights and peak live activations at the real size on the meta device (shapes
only), and the Gram recorder's bytes. `gpu_time_estimate` combines the counts with the H100 baseline
(uncached Wan2.1-1.3B-sized generation, 480p x 81 frames, CFG 5: 31.1 s of transformer time at 25 steps; a
figure from ../shared/GPU.md, one run measured outside this project, cited until benchmarks/gpu_scale.py has
run on a GPU) and bandwidth / FLOP-rate estimates of the capture and recorder overheads (constants below,
not measured). `--part memory` reruns only the memory part (seconds) and recomputes the estimate.

    python benchmarks/profile_at_scale.py            # about 30 minutes on one CPU thread; writes the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common
from benchmarks.common import (  # noqa: E402
    TINY_WIDTH,
    WAN_1_3B,
    WAN_1_3B_BLOCKS,
    WAN_1_3B_HIDDEN,
    WAN_480P_81_TOKENS,
    WAN_TEXT_DIM,
    WAN_TEXT_TOKENS,
    environment,
    wan_transformer,
    write_json,
)

STEPS, BLOCKS, FRAMES, HEIGHT, WIDTH, GUIDANCE = 50, WAN_1_3B_BLOCKS, 5, 32, 32, 5.0
HEADS, HEAD_DIM, FFN = TINY_WIDTH["num_attention_heads"], TINY_WIDTH["attention_head_dim"], TINY_WIDTH["ffn_dim"]
BUDGETS, NAMES = (0.6, 0.5, 0.33), ("slow", "balanced", "fast")
PROMPTS = [  # four prompts, as `videocache profile` uses for reference-wan (any other model: --prompts FILE)
    "a red circle moving left on a black background",
    "a green circle moving up on a blue background",
    "a blue square moving up on a green background",
    "a yellow triangle moving left on a white background",
]
# H100 figures for the estimates: an uncached transformer time measured outside this project, and assumed rates
BASELINE_S_PER_STEP = 31.1 / 25  # uncached, CFG (2 calls per step)
BASELINE_SOURCE = ("../shared/GPU.md: one H100 run measured outside this project (31.1 s at 25 steps); "
                   "benchmarks/gpu_scale.py has not run on a GPU yet")
FP32_FLOPS = 50e12  # sustained non-tensor-core float32 (67 TFLOPS peak; torch's default: no TF32 matmuls)
HBM_BYTES_S = 2.5e12  # sustained device memory bandwidth (3.35 TB/s peak)
SKETCH_COPY_RATIO = (3.5, 12.0)  # sketching one output costs this many bf16 -> fp32 copies of it (CPU; GPU atomics)
# Wan2.1-T2V-1.3B at 480p x 81 frames: 21 x 30 x 52 video tokens, hidden 1536, FFN 8960, 512 text tokens
REAL_TOKENS, REAL_HIDDEN, REAL_FFN, TEXT_TOKENS = WAN_480P_81_TOKENS, WAN_1_3B_HIDDEN, WAN_1_3B["ffn_dim"], WAN_TEXT_TOKENS


def real_flops() -> np.ndarray:
    """(blocks, components) FLOPs of one real-size call, by the Wan adapter's formulas."""
    n, d, f, m = REAL_TOKENS, REAL_HIDDEN, REAL_FFN, TEXT_TOKENS
    one = [8 * n * d * d + 4 * n * n * d, 4 * n * d * d + 4 * m * d * d + 4 * n * m * d, 4 * n * d * f]
    return np.tile(np.asarray(one, dtype=np.float64), (BLOCKS, 1))


def real_fraction(table) -> float:
    """FLOP-weighted computed fraction of a table at the real size (as TableSearch counts it)."""
    from videocache.table import Action

    flops = real_flops()
    skipped = np.asarray(table.actions) != Action.COMPUTE
    for r, (first, last) in enumerate(table.block_runs):  # a run reuse skips its blocks whole
        skipped[np.asarray(table.run_actions)[:, r] == Action.REUSE, first : last + 1] = True
    return round(1.0 - float((skipped * flops[None]).sum()) / (float(flops.sum()) * table.num_steps), 4)


def build_pipe():
    from diffusers import UniPCMultistepScheduler

    from videocache.pipelines.reference.build import build_pipeline

    pipe = build_pipeline(seed=0, with_transformer=False)
    pipe.transformer = wan_transformer(BLOCKS, TINY_WIDTH, dtype=torch.bfloat16)  # seed 0, as from_pretrained casts
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Counter:
    """Generations, transformer calls and engines per stage."""

    def __init__(self, pipe) -> None:
        self.stage = "setup"
        self.gens: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.gen_seconds: dict[str, float] = defaultdict(float)
        self.stage_seconds: dict[str, float] = defaultdict(float)
        self.engines: list[tuple[str, object, dict | None]] = []
        pipe.transformer.register_forward_pre_hook(lambda *_: self.calls.__setitem__(self.stage, self.calls[self.stage] + 1))
        original = type(pipe).__call__
        counter = self

        class Counted(type(pipe)):
            def __call__(self, *args, **kwargs):
                counter.gens[counter.stage] += 1
                start = time.perf_counter()
                try:
                    return original(self, *args, **kwargs)
                finally:
                    counter.gen_seconds[counter.stage] += time.perf_counter() - start

        pipe.__class__ = Counted

    def wrap(self, name: str, fn):
        def staged(*args, **kwargs):
            previous, self.stage = self.stage, name
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stage_seconds[name] += time.perf_counter() - start
                self.stage = previous
        return staged


def run_calibration(args: argparse.Namespace) -> dict:
    """The calibration on the small model, counted per stage."""
    import videocache
    import videocache.eval_vbench.calibration.runs as cal
    from videocache.fgbg import FgBgProfile
    from videocache.pipelines.attention_capture import default_profile_steps, profile_pipeline

    pipe = build_pipe()
    settings = cal.CalibrationSettings(steps=STEPS, frames=FRAMES, height=HEIGHT, width=WIDTH, guidance_scale=GUIDANCE)
    counter = Counter(pipe)
    engines = counter.engines
    apply = videocache.apply

    def counted_apply(*a, **kw):
        engine = apply(*a, **kw)
        engines.append((counter.stage, engine, None))
        return engine

    videocache.apply = counted_apply
    measure = cal.measure

    def measure_recorded(pipe_, profile, preset, prompts, refs, s):
        out = measure(pipe_, profile, preset, prompts, refs, s)
        stage, engine, _ = engines[-1]
        engines[-1] = (stage, engine, {"preset": profile.preset(preset), "generations": len(prompts)})
        return out

    # the stages, each under its own name (calibrate looks these functions up in its module)
    fgbg_steps = default_profile_steps(STEPS)
    with torch.no_grad():
        try:
            counter.wrap("fgbg", profile_pipeline)(pipe, PROMPTS[:2], fgbg_steps, progress=False, **settings.call())
        except ValueError as exc:  # a random model may show no foreground: the capture ran all the same
            print(f"fg/bg profile of the random model: {exc}")
    cal.record = counter.wrap("record", cal.record)
    cal.sensitivity = counter.wrap("sensitivity", cal.sensitivity)
    cal.measure = counter.wrap("measure", measure_recorded)
    background = [b for b in range(BLOCKS) if b % 2]
    fgbg = FgBgProfile(r_attn=tuple(0.1 if b in background else 0.3 for b in range(BLOCKS)),
                       classes=tuple("bg" if b in background else "fg" for b in range(BLOCKS)), tau=0.2,
                       steps_used=tuple(fgbg_steps))
    start = time.perf_counter()
    profile, report = cal.calibrate(pipe, "wan-size", PROMPTS, BUDGETS, settings, preset_names=NAMES, fgbg=fgbg,
                                    log=lambda m: print(m, flush=True), progress=False)
    total = time.perf_counter() - start

    latent_t = (FRAMES - 1) // pipe.vae_scale_factor_temporal + 1
    tokens = latent_t * (HEIGHT // pipe.vae_scale_factor_spatial // 2) * (WIDTH // pipe.vae_scale_factor_spatial // 2)
    scale = REAL_TOKENS * REAL_HIDDEN / (tokens * HEADS * HEAD_DIM)
    stages: dict[str, dict] = {}
    for stage, engine, info in engines:
        stats = engine.stats()
        row = stages.setdefault(stage, {"engines": 0, "generations": 0, "cache_peak_bytes_small": 0,
                                        "cache_peak_bytes_real": 0, "fractions": []})
        row["engines"] += 1
        row["cache_peak_bytes_small"] = max(row["cache_peak_bytes_small"], stats["cache_peak_bytes"])
        row["cache_peak_bytes_real"] = max(row["cache_peak_bytes_real"], round(stats["cache_peak_bytes"] * scale))
        if info is not None:
            # a measured candidate, on each calibration prompt. The search picked it within the budget window
            # by the small model's FLOP shares, as the real run picks its own by the real ones: its counted
            # fraction stands for a real candidate's (the same table at real-size FLOPs would not be in the window)
            row["generations"] += info["generations"]
            row["fractions"] += [round(float(stats["computed_fraction"]), 4)] * info["generations"]
        else:  # a recording or perturbation run: one generation with a fixed table, counted at real-size FLOPs
            row["generations"] += 1
            row["fractions"].append(real_fraction(engine.table))
    result = {
        "what": "videocache profile at Wan2.1-T2V-1.3B size, estimated from a small CPU run (see the docstring)",
        "command": "python benchmarks/profile_at_scale.py" + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "small_run": {"blocks": BLOCKS, "steps": STEPS, "heads": HEADS, "head_dim": HEAD_DIM, "ffn": FFN,
                      "tokens": tokens, "dtype": "bfloat16", "frames": FRAMES, "height": HEIGHT, "width": WIDTH,
                      "prompts": len(PROMPTS), "budgets": list(BUDGETS), "fgbg_prompts": 2,
                      "fgbg_steps": fgbg_steps, "background_blocks": background},
        "bytes_scale": scale,
        "generations": dict(counter.gens),
        "transformer_calls": dict(counter.calls),
        "cpu_seconds": {"stage": {k: round(v, 1) for k, v in counter.stage_seconds.items()},
                        "in_generations": {k: round(v, 1) for k, v in counter.gen_seconds.items()},
                        "calibrate_total": round(total, 1)},
        "engines": stages,
        "report": {"budgets": [{"budget": b["budget"], "stages": [
            {k: s[k] for k in ("stage", "predicted_fraction", "computed_fraction", "psnr", "kept")}
            for s in b["stages"]]} for b in report["budgets"]]},
        "environment": environment(),
    }
    print(json.dumps({k: result[k] for k in ("generations", "transformer_calls", "cpu_seconds")}, indent=2))
    for stage, row in stages.items():
        fr = row["fractions"]
        print(f"{stage:12s} engines {row['engines']:4d}  cache peak {row['cache_peak_bytes_real'] / 2**30:7.2f} GiB at "
              f"real size  computed fractions: n={len(fr)} sum={sum(fr):.2f}")
    return result


# -- memory at the real size, on the meta device -------------------------------------------------------
class LivePeak(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops inside the mode created and that are still referenced:
    what a caching allocator has to hold at least (no workspace, no fragmentation)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.refs.items() if ref.expired()]:
            self.live -= self.refs.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata not in self.refs:
                    self.refs[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        return out


def _flash_like(query, key, value, **kwargs):
    """What a fused attention kernel allocates: its output only (the N x N scores are never stored)."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def live_peaks() -> dict:
    """Weights and peak live activations of one real-size transformer call (plain, through the engine
    with an observer, with the fg/bg capture armed before and after the chunk bound) and of one VAE
    decode of 81 frames at 480 x 832, in bfloat16 on the meta device (shapes only, no compute). Attention
    is taken as a fused kernel (torch SDPA's flash / efficient backends on CUDA)."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    import videocache
    from videocache.pipelines.attention_capture import SelfAttentionCapture

    gib = 2**30
    transformer = wan_transformer(BLOCKS, WAN_1_3B, seed=None, device="meta", dtype=torch.bfloat16, in_channels=16,
                                  out_channels=16, text_dim=WAN_TEXT_DIM, rope_max_seq_len=1024)
    with torch.device("meta"):
        vae = AutoencoderKLWan().to(torch.bfloat16)
        t5 = UMT5EncoderModel(UMT5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                         vocab_size=256384, feed_forward_proj="gated-gelu")).to(torch.bfloat16)
    out: dict = {"weights_gib": {"transformer": _param_bytes(transformer) / gib, "text_encoder": _param_bytes(t5) / gib,
                                 "vae": _param_bytes(vae) / gib}}
    x = torch.zeros(1, 16, 21, 60, 104, device="meta", dtype=torch.bfloat16)
    text = torch.zeros(1, TEXT_TOKENS, WAN_TEXT_DIM, device="meta", dtype=torch.bfloat16)
    t = torch.zeros(1, device="meta")

    def call() -> float:
        with torch.no_grad(), LivePeak() as peak:
            transformer(x, t, text, return_dict=False)
        return peak.peak / gib

    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like
    try:
        calls = {"plain": call()}
        for label, bound in (("fgbg capture (1 GiB chunks)", "default"), ("fgbg capture (chunk 1024, before)", None)):
            kwargs = {} if bound == "default" else {"max_chunk_bytes": None}
            with SelfAttentionCapture(transformer, **kwargs) as capture:
                capture.armed = True
                calls[label] = call()
                calls[label.split(" (")[0] + " chunk" + (" before" if bound is None else "")] = capture.chunk_for(
                    (1, REAL_TOKENS, 12, 128))
        engine = videocache.apply_to_transformer(transformer, None, videocache.CacheTable.full_compute(1, BLOCKS),
                                                 observer=lambda *a: None, trace=False)
        try:
            with transformer.cache_context("cond"):
                calls["engine block_compute with an observer"] = call()
        finally:
            engine.remove()
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    out["transformer_call_peak_gib"] = calls
    with torch.no_grad(), LivePeak() as peak:
        vae.decode(torch.zeros(1, 16, 21, 60, 104, device="meta", dtype=torch.bfloat16))
    out["vae_decode_peak_gib"] = peak.peak / gib
    return out


def recorder_bytes() -> dict:
    """Bytes the Gram recorder holds at the real size: kept outputs (band + 1 steps per context, block and
    component) exact (float64 outputs, before) and sketched (float64 sketches), plus the bucket index."""
    from videocache.calibrate import _SKETCH_CHUNK, SKETCH_SIZE, GramRecorder

    rec = GramRecorder(STEPS, BLOCKS)
    numel = REAL_TOKENS * REAL_HIDDEN
    kept = (rec.band + 1) * 2 * BLOCKS * 3
    return {"values_per_output": numel, "sketched": rec.sketched(numel), "kept_outputs": kept,
            "exact_bytes": kept * numel * 8, "sketch_bytes": kept * SKETCH_SIZE * 8, "bucket_index_bytes": numel * 4,
            "transient_bytes": _SKETCH_CHUNK * 8 + 2 * SKETCH_SIZE * 8,
            "gram_accumulator_bytes": BLOCKS * 3 * STEPS * STEPS * 8}


def vae_decode_flops() -> float:
    """FLOPs of one VAE decode of 81 frames at 480 x 832 (torch's FLOP counter on the meta device)."""
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLWan()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(torch.zeros(1, 16, 21, 60, 104, device="meta"))
    return float(counter.get_total_flops())


def gpu_time_estimate(result: dict) -> dict:
    """Seconds of GPU time per stage of the real run: transformer time scales with the computed fraction of
    each generation; the fg/bg capture (float32 Q K^T of all heads, materialised chunk by chunk, then
    scale, softmax and column sums: about six passes over the logits) and the Gram sketches (per computed
    output) are added. VAE decodes and the T5 encodes are not in the baseline and are listed apart."""
    per_gen = STEPS * BASELINE_S_PER_STEP
    n, d = REAL_TOKENS, REAL_HIDDEN
    capture_block = 2 * n * n * d / FP32_FLOPS + 6 * 12 * n * n * 4 / HBM_BYTES_S
    captured_calls = result["generations"]["fgbg"] * len(result["small_run"]["fgbg_steps"])
    copy_s = n * d * (2 + 4) / HBM_BYTES_S
    outputs = result["generations"]["record"] * STEPS * 2 * BLOCKS * 3
    engines = result["engines"]
    out = {"uncached_generation_s": per_gen, "baseline_source": BASELINE_SOURCE, "capture_s_per_block": capture_block,
           "sketch_ms_per_output": [1e3 * r * copy_s for r in SKETCH_COPY_RATIO]}
    stages = {
        "fgbg": {"generations": result["generations"]["fgbg"], "transformer_s": result["generations"]["fgbg"] * per_gen,
                 "overhead_s": captured_calls * BLOCKS * capture_block},
        "record": {"generations": result["generations"]["record"],
                   "transformer_s": per_gen * sum(engines["record"]["fractions"]),
                   "overhead_s": [outputs * r * copy_s for r in SKETCH_COPY_RATIO]},
        "sensitivity": {"generations": result["generations"]["sensitivity"],
                        # the unperturbed reference latent runs without an engine: computed fraction 1
                        "transformer_s": per_gen * (sum(engines["sensitivity"]["fractions"])
                                                    + result["generations"]["sensitivity"] - engines["sensitivity"]["generations"]),
                        "overhead_s": 0.0},
        "measure": {"generations": result["generations"]["measure"],
                    "transformer_s": per_gen * sum(engines["measure"]["fractions"]), "overhead_s": 0.0},
    }
    for row in stages.values():
        low = row["overhead_s"][0] if isinstance(row["overhead_s"], list) else row["overhead_s"]
        high = row["overhead_s"][1] if isinstance(row["overhead_s"], list) else row["overhead_s"]
        row["total_s"] = [row["transformer_s"] + low, row["transformer_s"] + high]
    out["stages"] = stages
    out["total_s"] = [sum(r["total_s"][0] for r in stages.values()), sum(r["total_s"][1] for r in stages.values())]
    out["vae_decodes"] = result["generations"]["record"] + result["generations"]["measure"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "profile_at_scale.json"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", choices=["all", "calibration", "memory"], default="all",
                   help="what to (re)run; the other parts of an existing --out are kept")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() and args.part != "all" else {}
    if args.part in ("all", "calibration"):
        result.update(run_calibration(args))
    if args.part in ("all", "memory"):
        result["memory"] = {**live_peaks(), "vae_decode_tflop": vae_decode_flops() / 1e12, "recorder": recorder_bytes(),
                            "command": "python benchmarks/profile_at_scale.py --part memory"}
        print(json.dumps(result["memory"], indent=2))
    if "generations" in result:
        result["gpu_time_estimate"] = gpu_time_estimate(result)
        print(json.dumps(result["gpu_time_estimate"], indent=2))
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
