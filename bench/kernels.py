"""Micro-benchmark of one linear layer: fp32 F.linear vs Lanner's own kernels vs ATen's WOQ kernel paths.

For each weight shape (default: 2048 -> 5632 and 5632 -> 2048, the TinyLlama-1.1B MLP) and each number
of activation rows M, time one forward call of:

    fp32            F.linear on the fp32 weight (the unquantized baseline)
    int8 packed     torch._weight_int8pack_mm, bf16 activations (the decode kernel)
    int8 dequant    int8 -> fp32 in 4 MiB row chunks, then sgemm (the prefill kernel)
    int8 dequant-1  the same, whole weight dequantized at once (is chunking worth it?)
    int4 packed     torch._weight_int4pack_mm_for_cpu, bf16 activations
    int4 dequant    our unpack of ATen's nibbles -> fp32 in chunks, then sgemm
    int8 lanner     Lanner's own kernel (app/quant/csrc): tiles, integer dot products, Q8 activations
    int4 lanner     the same for int4 (groups of 32)

and report ms/call (median), effective GB/s of weight bytes read, and for each mode the smallest M at
which dequant beats packed (the "auto" crossover; app/quant/woq.py CROSSOVER_M holds the value used).
Writes bench/results/kernels.{json,md,png}.

    python -m bench.kernels                      # full run (~1-2 min on 2 cores)
    python -m bench.kernels --rows 1 8 --iters 3 # quick look
    python -m bench.kernels --render             # rewrite .md/.png from the saved .json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from app.quant import kernels, woq
from app.quant.isa import detect_isa
from app.quant.woq import (
    NEVER,
    Int4Linear,
    Int8Linear,
    TiledInt4Linear,
    TiledInt8Linear,
    pick_group_size,
    probe_int4_layout,
    quantize_weight,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SHAPES = ((2048, 5632), (5632, 2048))  # (K in, N out)
DEFAULT_ROWS = (1, 8, 16, 32, 64, 128, 256, 512)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cpus_available": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "isa": detect_isa().describe(), "python": platform.python_version()}


def time_call(fn: Callable[[], object], iters: int, budget_s: float) -> float:
    """Median seconds per call: 1 warm-up call, then up to `iters` timed calls within `budget_s`."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (len(times) < 2 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes(module: nn.Module) -> int:
    """Bytes a call must read for the weight: the quantized values plus scales/zeros (no bias)."""
    if isinstance(module, Int8Linear):
        return module.weight.numel() + module.scales_bf16.numel() * 2
    if isinstance(module, Int4Linear):
        return module.weight.numel() + module.scales_and_zeros.numel() * 2
    if isinstance(module, TiledInt4Linear):  # uint8 nibbles, scale codes (+ fp32 units) and zero points
        return module.weight.numel() + module.scales.numel() + module.zeros.numel()
    if isinstance(module, TiledInt8Linear):
        return module.weight.numel() + module.scales.numel() * 4
    return module.weight.numel() * 4


@torch.inference_mode()
def bench_shape(k: int, n: int, rows: list[int], iters: int, budget_s: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    t0 = time.perf_counter()
    int8_packed = Int8Linear.from_linear(linear, NEVER)
    t_q8 = time.perf_counter() - t0
    int8_dequant = Int8Linear(int8_packed.weight, int8_packed.scales, None, 0)
    layout = probe_int4_layout()
    group = pick_group_size(k)
    assert group is not None, f"no int4 group size divides K={k}"
    t0 = time.perf_counter()
    int4_packed = Int4Linear.from_linear(linear, group, NEVER, layout)
    t_q4 = time.perf_counter() - t0
    int4_dequant = Int4Linear(int4_packed.weight, int4_packed.scales_and_zeros, None, n, k, group, 0, layout)

    def whole_dequant(x: torch.Tensor) -> torch.Tensor:  # int8, one dequantized copy of the whole weight
        saved = woq.DEQUANT_CHUNK_BYTES
        woq.DEQUANT_CHUNK_BYTES = 1 << 62
        try:
            return int8_dequant(x)
        finally:
            woq.DEQUANT_CHUNK_BYTES = saved

    variants: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
        "fp32": (lambda x: F.linear(x, linear.weight), weight_bytes(linear)),
        "int8 packed": (int8_packed, weight_bytes(int8_packed)),
        "int8 dequant": (int8_dequant, weight_bytes(int8_packed)),
        "int8 dequant-1": (whole_dequant, weight_bytes(int8_packed)),
        "int4 packed": (int4_packed, weight_bytes(int4_packed)),
        "int4 dequant": (int4_dequant, weight_bytes(int4_packed)),
    }
    if kernels.load().ok:
        own8 = TiledInt8Linear.from_quantized(quantize_weight(linear.weight.detach(), "int8"))
        own4 = TiledInt4Linear.from_quantized(quantize_weight(linear.weight.detach(), "int4", group))
        variants["int8 lanner"] = (own8, weight_bytes(own8))
        variants["int4 lanner"] = (own4, weight_bytes(own4))
    table: dict[str, dict[str, float]] = {name: {} for name in variants}
    for m in rows:
        x = torch.randn(m, k, generator=gen)
        for name, (fn, wbytes) in variants.items():
            sec = time_call(lambda: fn(x), iters, budget_s)
            table[name][str(m)] = sec * 1e3
            print(f"  {k}->{n} M={m:4d} {name:15s} {sec * 1e3:9.3f} ms  {wbytes / sec / 1e9:6.1f} GB/s",
                  flush=True)
    crossover = {}
    for mode in ("int8", "int4"):
        faster = [m for m in rows if table[f"{mode} dequant"][str(m)] < table[f"{mode} packed"][str(m)]]
        crossover[mode] = min(faster) if faster else None
    return {"k": k, "n": n, "group_size": group, "int4_layout": str(layout),
            "weight_bytes": {name: wb for name, (_, wb) in variants.items()},
            "quantize_seconds": {"int8": t_q8, "int4": t_q4}, "ms": table,
            "dequant_faster_from_m": crossover}


def to_markdown(result: dict) -> str:
    info = result["machine"]
    out = ["# Linear-layer kernels: fp32 vs weight-only int8/int4", "",
           f"CPU: {info['cpu']} ({info['cpus_available']} CPUs, {info['torch_threads']} torch threads); "
           f"torch {info['torch']}; {info['isa']}.", "",
           f"ms per call (median of up to {result['iters']} calls), and GB/s of weight bytes read. "
           "packed = ATen's packed kernel with bf16 activations; dequant = our dequantize-to-fp32 (4 MiB row "
           "chunks) + sgemm; dequant-1 = the whole weight dequantized at once; lanner = Lanner's own kernel "
           "(app/quant/csrc/woq_kernels.cpp: integer dot products, activations quantized per 32-block). "
           "One layer called again and again stays in the CPU's last-level cache when it fits (a 23 MB "
           "layer in a 32 MiB L3), so GB/s at small M can exceed the memory bandwidth; "
           "bench/decode_bench.py measures whole models, whose weights come from DRAM.", ""]
    current = dict(woq.CROSSOVER_M)
    for shape in result["shapes"]:
        k, n, ms = shape["k"], shape["n"], shape["ms"]
        rows = list(next(iter(ms.values())).keys())
        out += [f"## {k} -> {n} (int4 group size {shape['group_size']})", "",
                "| M | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
        for m in rows:
            cells = []
            for name in ms:
                t = ms[name][m]
                gbs = shape["weight_bytes"][name] / (t / 1e3) / 1e9
                cells.append(f"{t:.2f} ({gbs:.0f} GB/s)" if int(m) <= 8 else f"{t:.2f}")
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        for mode in ("int8", "int4"):  # same-run ratio: ATen's faster path / Lanner's kernel
            if f"{mode} lanner" in ms:
                ratios = ", ".join(
                    f"M={m} {min(ms[f'{mode} packed'][m], ms[f'{mode} dequant'][m]) / ms[f'{mode} lanner'][m]:.1f}x"
                    for m in rows)
                out += ["", f"{mode}: Lanner's kernel vs ATen's faster path: {ratios}"]
        q = shape["quantize_seconds"]
        out += ["", f"Dequant faster than packed from M = {shape['dequant_faster_from_m']} "
                "(of the rows measured); "
                f"quantizing this layer took {q['int8'] * 1e3:.0f} ms (int8), "
                f"{q['int4'] * 1e3:.0f} ms (int4).",
                ""]
    out += [f"`CROSSOVER_M` in app/quant/woq.py: {current} (auto uses dequant for M >= crossover on CPUs "
            "without native bf16).", ""]
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = result["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for name, series in shape["ms"].items():
            ms = [int(m) for m in series]
            ax.plot(ms, list(series.values()), marker="o", label=name,
                    linestyle="--" if "dequant" in name else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rows M (tokens in the step)")
        ax.set_ylabel("ms per call")
        ax.set_title(f"Linear {shape['k']} -> {shape['n']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']} - torch {result['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS))
    p.add_argument("--shapes", nargs="+", default=[f"{k}x{n}" for k, n in DEFAULT_SHAPES],
                   help="KxN: in_features x out_features")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget", type=float, default=1.0, help="max seconds of timed calls per cell")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render", action="store_true",
                   help="only rewrite the .md and .png from the existing .json")
    args = p.parse_args(argv)
    if args.render:
        result = json.loads((args.out / "kernels.json").read_text())
        (args.out / "kernels.md").write_text(to_markdown(result))
        plot(result, args.out / "kernels.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine_info(), "iters": args.iters, "rows": args.rows, "shapes": []}
    print(json.dumps(result["machine"]))
    for spec in args.shapes:
        k, n = (int(v) for v in spec.lower().split("x"))
        result["shapes"].append(bench_shape(k, n, args.rows, args.iters, args.budget))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(result, indent=2))
    (args.out / "kernels.md").write_text(to_markdown(result))
    plot(result, args.out / "kernels.png")
    print(f"wrote {args.out}/kernels.{{json,md,png}}")


if __name__ == "__main__":
    main()
