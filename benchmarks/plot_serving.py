"""Plot benchmarks/serving.py's results: TTFT and TPOT (p50, p99) against achieved load.

    python benchmarks/plot_serving.py serving_results.json --out serving_latency.png

Needs matplotlib, which the engine does not depend on.
"""

from __future__ import annotations

import argparse
import json


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = sorted(data["rates"], key=lambda r: r["achieved_rps"])
    load = [r["achieved_rps"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "ttft_ms", "time to first token"), (axes[1], "tpot_ms", "time per output token")):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(load, [r[key][q] for r in rows], style, label=q)
        for x, r in zip(load, rows):
            ax.annotate(r["rate"], (x, r[key]["p99"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7, color="gray")
        ax.set_xlabel("achieved load (req/s); labels: offered rate")
        ax.margins(y=0.12)  # room for the labels above the top points
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")  # queueing makes TTFT span orders of magnitude near saturation
    args = data["args"]
    subtitle = f"{args['shape']} on {data['device']}, {args['num_requests']} requests"
    if data.get("offline"):
        subtitle += f"; throughput at saturation / offline (medians) = {data['saturation_over_offline']:.3f}"
    fig.suptitle(subtitle)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json_path")
    ap.add_argument("--out", default="serving_latency.png")
    args = ap.parse_args()
    plot(args.json_path, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
