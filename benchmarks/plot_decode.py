"""Plots decode.py results files: batch-1 decode tok/s per system, at temperature 1.0 and
greedy, beside the host-memory roofline of fiddler's run, and TTFT; one panel per file.

    python benchmarks/plot_decode.py benchmarks/results/decode-mixtral-8x7b-8layers-h100.json \\
        benchmarks/results/decode-qwen3-30b-a3b-h100.json --out benchmarks/results/decode-h100.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

TEMPERATURES = (("t1", "temperature 1.0"), ("t0", "greedy"))
LABELS = {"fiddler": "fiddler", "stock_uva_experts": "stock vLLM,\nexpert-only UVA offload"}


def panel_title(result: dict) -> str:
    full = shapes.SHAPES[result["shape"]][1]
    layers = result.get("layers") or full
    b = result["budget"]
    kept = f"all {full} layers" if layers == full else f"{layers} of {full} layers"
    return (f"{result['shape']} ({kept}), {result['gpu_gib']:g} GB card:\n"
            f"{b['resident_gib']:g} of {b['expert_gib']:g} GiB of experts on the GPU")


def decode_panel(ax, result: dict) -> None:
    rows = [r for r in result["rows"] if r.get("decode")]
    width = 0.38
    top = 0.0
    for i, (key, label) in enumerate(TEMPERATURES):
        xs = [j + (i - 0.5) * width for j in range(len(rows))]
        values = [r["decode"].get(key, {}).get("tok_s", 0.0) for r in rows]
        top = max([top, *values])
        bars = ax.bar(xs, values, width, label=label, color=("tab:blue", "tab:gray")[i])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    for r in rows:
        roof = r["decode"].get("t1", {}).get("roofline_tok_s")
        if roof:
            top = max(top, roof)
            ax.axhline(roof, color="k", linestyle="--", linewidth=1,
                       label=f"{r['system']} roofline at temperature 1.0 (host DRAM, CPU + DMA)")
    ax.set_ylim(0, top * 1.4)  # room for the legend above the bars
    ax.set_xlim(-0.7, len(rows) - 0.3)
    ax.set_xticks(range(len(rows)), [LABELS.get(r["system"], r["system"]) for r in rows], fontsize=8)
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(panel_title(result), fontsize=9)
    missing = result.get("rows_missing")
    if missing:
        ax.text(0.99, 0.02, "not measured: " + ", ".join(missing), transform=ax.transAxes, ha="right", fontsize=7)
    ax.legend(fontsize=7, loc="upper right")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="decode.py results files")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.load(open(path)) for path in args.results]
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        decode_panel(ax, result)
    devices = sorted({r.get("device", "") for res in results for r in res["rows"] if r.get("device")})
    fig.suptitle(f"decode.py on {', '.join(devices)}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
