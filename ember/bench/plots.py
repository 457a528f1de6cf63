"""PNG figures of benchmark results (matplotlib, Agg backend: no display needed): `ember bench serve --plot`
(throughput and latency percentiles against concurrency) and `ember bench offline --plot` (output tok/s
against batch size, ember beside its baseline, with the ratio)."""

from __future__ import annotations

PERCENTILES = (50, 90, 99)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, work on a machine without a display
    import matplotlib.pyplot as plt

    return plt


def _log2_axis(ax, xs: list[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def plot_serve(summaries: list[dict], path: str, title: str) -> None:
    """Output throughput, and TTFT/TPOT/E2E latency p50/p90/p99, against concurrency (one point per level)."""
    plt = _pyplot()
    xs = [s["concurrency"] for s in summaries]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0][0]
    ax.plot(xs, [s["output_throughput"] for s in summaries], marker="o")
    ax.set_title("output throughput (tok/s)")
    for ax, key, name in ((axes[0][1], "ttft_ms", "TTFT (ms)"), (axes[1][0], "tpot_ms", "TPOT (ms)"),
                          (axes[1][1], "e2el_ms", "E2E latency (ms)")):
        for p in PERCENTILES:
            ax.plot(xs, [s[f"p{p}_{key}"] or 0 for s in summaries], marker="o", label=f"p{p}")
        ax.set_title(name)
        ax.legend()
    for ax in axes.flat:
        _log2_axis(ax, xs, "concurrency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_offline(points: list[dict], path: str, title: str, baseline: str | None) -> None:
    """Output tok/s against batch size for ember and (when there is one) the baseline, and their ratio.
    `points`: [{"batch_size", "ember_tok_s", "baseline_tok_s" (absent without a baseline)}]."""
    plt = _pyplot()
    xs = [p["batch_size"] for p in points]
    has_baseline = baseline is not None and all("baseline_tok_s" in p for p in points)
    fig, axes = plt.subplots(1, 2 if has_baseline else 1, figsize=(11 if has_baseline else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(xs, [p["ember_tok_s"] for p in points], marker="o", label="ember")
    if has_baseline:
        ax.plot(xs, [p["baseline_tok_s"] for p in points], marker="s", label=baseline)
    ax.set_title("output tok/s")
    ax.legend()
    _log2_axis(ax, xs, "batch size")
    if has_baseline:
        ax = axes[0][1]
        ax.plot(xs, [p["ember_tok_s"] / p["baseline_tok_s"] for p in points], marker="o", color="tab:green")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"ember / {baseline} (output tok/s)")
        _log2_axis(ax, xs, "batch size")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
