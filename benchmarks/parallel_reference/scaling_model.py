"""A scaling model for Wan2.1-14B at 720p x 81 frames on 8 H100s: communication per layer against compute.

Writes scaling_model.md next to this file from the figures below (each cited there). No GPU needed:

    python benchmarks/parallel_reference/scaling_model.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Wan2.1-14B (diffusers WanTransformer3DModel config): 40 blocks, 40 heads x 128 = 5120, FFN 13824, UMT5 text 512
N, D, F, M, LAYERS, HEADS = 75_600, 5120, 13_824, 512, 40, 40  # 720p x 81 frames: 21 x 45 x 80 tokens
P = 8
BYTES = 2  # bf16
STEPS, CALLS = 50, 2  # Wan2.1's default 50 steps, two guidance branches per step
PEAK_BF16 = 989e12  # H100 SXM dense BF16 Tensor Core (datasheet: 1,979 TFLOPS with sparsity)
NVLINK_BIDIR = 900e9  # H100 SXM NVLink 4, per GPU, bidirectional (datasheet)
NCCL_BUSBW = 370e9  # NCCL's effective NVLink bandwidth on H100 for non-all-reduce collectives (nccl-tests #212)
OFFICIAL_1GPU_S, OFFICIAL_8GPU_S = 1838.0, 288.0  # Wan2.1 README, 14B T2V 720p, H100
# ../shared/GPU.md's H100 baseline, one run measured outside this project (bf16, native SDPA, random weights): a
# Wan2.1-1.3B-sized transformer (30 blocks, 1536 wide, FFN 8960) at 32,760 tokens, 25 steps x 2 calls, uncached
# transformer time; cited until benchmarks/gpu_scale.py has run on a GPU
OUTSIDE_H100_SMALL_S = 31.1


def layer_flops(n: int, d: int, f: int, m: int) -> dict[str, float]:
    """FLOPs of one block call over n video tokens (the same formulas as eval_vbench/metrics/flops.py)."""
    return {
        "self-attention projections (q, k, v, out)": 2 * 4 * n * d * d,
        "self-attention core (QK^T, PV)": 2 * 2 * n * n * d,
        "cross-attention": 2 * (2 * n * d * d + 2 * m * d * d + 2 * n * m * d),
        "feed-forward": 2 * 2 * n * d * f,
    }


def model() -> dict[str, float]:
    flops = layer_flops(N, D, F, M)
    total = sum(flops.values())
    per_gpu = total / P  # every part is split by tokens (Ulysses splits heads in the core; same work)
    run_flops = total * LAYERS * CALLS * STEPS
    achieved_1gpu = run_flops / OFFICIAL_1GPU_S  # everything in the official time counted as transformer time
    small = sum(layer_flops(32_760, 1536, 8960, M).values()) * 30 * 2 * 25
    achieved_small = small / OUTSIDE_H100_SMALL_S
    fraction = 0.40  # realistic achieved share of the bf16 peak, between the two derived figures above
    throughput = fraction * PEAK_BF16
    t_layer = per_gpu / throughput
    shard = N / P * D * BYTES  # one rank's slice of q (or k, v, out) in bf16
    ulysses_sent = 4 * shard * (P - 1) / P  # per rank per layer: 4 all-to-alls, (P-1)/P of each leaves the rank
    ring_sent = 2 * shard * (P - 1)  # per rank per layer: K and V passed P-1 times
    ring_step_flops = 2 * 2 * (N / P) ** 2 * D  # one ring step's attention core (N/P queries x N/P keys)
    out = {
        "flops_per_layer": total,
        "flops_per_layer_per_gpu": per_gpu,
        "achieved_1gpu_official": achieved_1gpu,
        "achieved_small_measured": achieved_small,
        "achieved_small_source": "../shared/GPU.md: one H100 run measured outside this project "
                                 "(benchmarks/gpu_scale.py has not run on a GPU yet)",
        "fraction": fraction,
        "t_layer_s": t_layer,
        "shard_bytes": shard,
        "ulysses_sent": ulysses_sent,
        "ring_sent": ring_sent,
        "ulysses_s": ulysses_sent / NCCL_BUSBW,
        "ring_s": ring_sent / NCCL_BUSBW,
        "ulysses_s_half": ulysses_sent / (NCCL_BUSBW / 2),
        "ring_s_half": ring_sent / (NCCL_BUSBW / 2),
        "ring_step_compute_s": ring_step_flops / throughput,
        "ring_step_comm_s": 2 * shard / (NCCL_BUSBW),
        "run_flops": run_flops,
        "official_efficiency": OFFICIAL_1GPU_S / (P * OFFICIAL_8GPU_S),
    }
    comm = out["ulysses_s"] / (out["t_layer_s"] + out["ulysses_s"])
    # Amdahl: 288 = S + (1838 - S) / 8 * (1 + c)  ->  the part that does not scale, S
    c = out["ulysses_s"] / out["t_layer_s"]
    serial = (OFFICIAL_8GPU_S - OFFICIAL_1GPU_S * (1 + c) / P) / (1 - (1 + c) / P)
    out.update(ulysses_fraction_of_layer=comm, ring_fraction_of_layer=out["ring_s"] / (out["t_layer_s"] + out["ring_s"]),
               serial_s=serial)
    # a cache on top: skipped steps skip their compute and their collectives alike
    parallel_part = OFFICIAL_8GPU_S - serial
    out["cached"] = {
        name: serial + cf * parallel_part for name, cf in (("slow", 0.60), ("balanced", 0.50), ("fast", 0.34))
    }
    return out


def render(m: dict[str, float]) -> str:
    ms = 1e3
    mb = 1e-6
    flops = layer_flops(N, D, F, M)
    lines = [
        "# Scaling model: Wan2.1-14B, 720p x 81 frames, 8 H100 SXM",
        "",
        "`python benchmarks/parallel_reference/scaling_model.py` (arithmetic only; the figures it uses are cited below).",
        "",
        f"**Shape.** 81 frames at 1280x720 -> latent 21 x 90 x 160 -> patches (1, 2, 2): **{N:,} video tokens**; hidden "
        f"{D} = {HEADS} heads x 128, FFN {F}, {LAYERS} blocks, text {M} tokens; bf16; {STEPS} steps x {CALLS} "
        f"guidance calls. Ulysses over P = {P} GPUs keeps {HEADS // P} heads per GPU (40 divides by 8; Wan2.1-1.3B's "
        "12 heads do not, which is why its 8-GPU recipe uses ring or Ulysses 4 x ring 2).",
        "",
        "## Compute per layer",
        "",
        "| part of one block call | GFLOP (all tokens) | GFLOP per GPU (P = 8) |",
        "|---|---:|---:|",
    ]
    for name, value in flops.items():
        lines.append(f"| {name} | {value / 1e9:,.0f} | {value / P / 1e9:,.0f} |")
    lines += [
        f"| **block** | **{m['flops_per_layer'] / 1e9:,.0f}** | **{m['flops_per_layer_per_gpu'] / 1e9:,.0f}** |",
        "",
        f"Achieved throughput: the official single-GPU time ({OFFICIAL_1GPU_S:.0f} s for {m['run_flops'] / 1e15:,.0f} PFLOP "
        f"of transformer work) is **{m['achieved_1gpu_official'] / 1e12:.0f} TFLOP/s = "
        f"{m['achieved_1gpu_official'] / PEAK_BF16:.0%}** of the {PEAK_BF16 / 1e12:.0f} TFLOP/s dense bf16 peak (a lower "
        "bound: the VAE and text encoder are in that time too); the H100 run of a 1.3B-sized Wan at 32,760 tokens "
        f"in ../shared/GPU.md (measured outside this project) reached **{m['achieved_small_measured'] / 1e12:.0f} TFLOP/s = {m['achieved_small_measured'] / PEAK_BF16:.0%}**. "
        f"The model uses **{m['fraction']:.0%} ({m['fraction'] * PEAK_BF16 / 1e12:.0f} TFLOP/s)**: one block call takes "
        f"**{m['t_layer_s'] * ms:.1f} ms per GPU** (attention core {flops['self-attention core (QK^T, PV)'] / m['flops_per_layer']:.0%} "
        "of the FLOPs at this length).",
        "",
        "## Communication per layer (self-attention only: Wan's cross-attention runs on the local shard, no collective)",
        "",
        f"One rank's slice of q (or k, v, out): {N // P:,} tokens x {D} x 2 bytes = **{m['shard_bytes'] * mb:.1f} MB**.",
        "",
        "| scheme | bytes leaving each GPU per layer | at 370 GB/s | at 185 GB/s | share of a layer (370 GB/s, not hidden) |",
        "|---|---:|---:|---:|---:|",
        f"| Ulysses (4 all-to-alls: q, k, v, out; (P-1)/P of each slice leaves) | {m['ulysses_sent'] * mb:,.0f} MB | "
        f"{m['ulysses_s'] * ms:.2f} ms | {m['ulysses_s_half'] * ms:.2f} ms | {m['ulysses_fraction_of_layer']:.1%} |",
        f"| Ring (K and V passed P-1 = 7 times) | {m['ring_sent'] * mb:,.0f} MB | {m['ring_s'] * ms:.2f} ms | "
        f"{m['ring_s_half'] * ms:.2f} ms | {m['ring_fraction_of_layer']:.1%} |",
        "",
        "Summed over all GPUs, Ulysses moves N x hidden x 2 bytes x (P-1)/P per all-to-all "
        f"({N * D * BYTES * (P - 1) / P * mb:,.0f} MB), ring 2 x N x hidden x 2 bytes x (P-1) per layer. The CPU benchmark "
        "(results.md) counts exactly these formulas at P = 2, where Ulysses and ring move the same bytes; at P = 8 ring "
        "moves 4x more.",
        "",
        "Bandwidth: NVLink 4 gives an H100 SXM 900 GB/s bidirectional (450 GB/s each way); NCCL reaches about 370 GB/s "
        "of it as bus bandwidth for collectives other than all-reduce (the rest is protocol overhead), and an "
        "all-to-all's bus bandwidth is its algorithm bandwidth x (P-1)/P, i.e. the bytes that leave a GPU divided by the "
        "time. The 185 GB/s column is a pessimistic half of that (medium message sizes, contention with compute).",
        "",
        "## What fraction of a step is communication, and can it be hidden",
        "",
        f"- **Ulysses**: {m['ulysses_s'] * ms:.2f} ms of all-to-all against {m['t_layer_s'] * ms:.1f} ms of compute per layer: "
        f"**about {m['ulysses_fraction_of_layer']:.0%} of a step** ({m['ulysses_s_half'] / (m['t_layer_s'] + m['ulysses_s_half']):.0%} "
        "at half the bandwidth). The q/k/v all-to-alls sit on the critical path of attention; they can be overlapped only "
        "with the projections of the next tensor (diffusers' async Ulysses, cache-dit's `ulysses_async`), which is not "
        "worth much at 2 %.",
        f"- **Ring**: {m['ring_s'] * ms:.2f} ms per layer ({m['ring_fraction_of_layer']:.0%}) if nothing overlaps, as in "
        "diffusers 0.42.1's templated ring, which all-gathers K/V before attending. Passed peer to peer instead, each "
        f"ring step moves {2 * m['shard_bytes'] * mb:.0f} MB ({m['ring_step_comm_s'] * ms:.2f} ms) while computing "
        f"{m['ring_step_compute_s'] * ms:.1f} ms of attention: fully hidable, 9x headroom.",
        f"- **Against the official table**: {OFFICIAL_1GPU_S:.0f} s on 1 GPU, {OFFICIAL_8GPU_S:.0f} s on 8 = "
        f"{OFFICIAL_1GPU_S / OFFICIAL_8GPU_S:.2f}x, {m['official_efficiency']:.0%} efficiency. Communication explains about "
        f"2 points of the missing {1 - m['official_efficiency']:.0%}; solving 288 = S + (1838 - S) / 8 x (1 + comm) gives "
        f"**S = {m['serial_s']:.0f} s that do not scale** (VAE decode, text encoding, per-step work outside the blocks, "
        "load imbalance): an inference, not a measurement.",
        "",
        "## What a cache saves on top",
        "",
        "A skipped step (or skipped block) skips its all-to-alls too: the engine makes the same decision on every rank "
        "from its table, so no rank enters a collective another skips. The CPU benchmark measures it (results.md): the "
        "attention bytes per step fall in proportion to the computed fraction, only the final gather of the output "
        "stays. So "
        "communication stays the same share of a step, and a cache's speedup multiplies the parallel one. With the "
        "Wan2.1-14B presets' computed fractions at 50 steps (slow 0.60, balanced 0.50, fast 0.34; stand-in statistics, "
        "not calibrated on real weights) and the non-scaling part unchanged:",
        "",
        "| 8 H100 | estimated time | against 8 GPUs uncached | against 1 GPU uncached |",
        "|---|---:|---:|---:|",
        f"| uncached (official) | {OFFICIAL_8GPU_S:.0f} s | 1.00x | {OFFICIAL_1GPU_S / OFFICIAL_8GPU_S:.1f}x |",
    ]
    for name, t in m["cached"].items():
        lines.append(f"| videocache {name} | {t:.0f} s | {OFFICIAL_8GPU_S / t:.2f}x | {OFFICIAL_1GPU_S / t:.1f}x |")
    lines += [
        "",
        "The non-scaling part then dominates (the VAE decode is next to parallelise), and the engine's own cost on a "
        "skipped call (benchmarks/engine_overhead.md) is not included.",
        "",
        "## Sources",
        "",
        "- NVIDIA H100 Tensor Core GPU datasheet: H100 SXM, BF16 Tensor Core 1,979 TFLOPS with sparsity (989 dense), "
        "NVLink 900 GB/s per GPU. https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
        "- NCCL on H100 NVLink: \"450GB/s is the line rate. With the protocol overhead (~20%) NCCL can get an effective "
        "NVLink bandwidth of 370GB/s, which you can observe as BusBw when running non-allreduce operations\" (NCCL "
        "maintainer, https://github.com/NVIDIA/nccl-tests/issues/212).",
        "- nccl-tests all-to-all bus bandwidth = algorithm bandwidth x (n-1)/n, \"since 1/n of the data is local\" "
        "(https://github.com/NVIDIA/nccl-tests/issues/130).",
        "- Wan2.1 computational-efficiency table (Wan-Video/Wan2.1 README): T2V-14B at 720p on H100, 1838 s on 1 GPU, "
        "288 s on 8.",
        "- A figure from ../shared/GPU.md, one run on one H100 measured outside this project (benchmarks/gpu_scale.py "
        "has not run on a GPU yet): a Wan2.1-1.3B-sized transformer, 32,760 tokens, 25 steps with CFG: "
        f"{OUTSIDE_H100_SMALL_S} s transformer time uncached, bf16, native attention, random weights.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    m = model()
    (HERE / "scaling_model.md").write_text(render(m))
    (HERE / "scaling_model.json").write_text(json.dumps(m, indent=2) + "\n")
    print(f"wrote {HERE / 'scaling_model.md'}")


if __name__ == "__main__":
    main()
