"""The evaluate stage's PNG plots: compression against bits per byte per method, per-token
drift per method, generation speed of the original against the expanded model, and the
training loss curve."""

from __future__ import annotations

from pathlib import Path

PLOT_TOKENS = 40  # per-token drift: at most this many tokens


def write_plots(results: dict, loss_curve: list[dict], out_dir: Path, bits: dict | None = None,
                generation: dict | None = None) -> list[str]:
    """Compression against bits per byte (`bits`: {method: bits_per_byte summary}),
    per-token hidden-state drift per method, generation speed (`generation`: eval.json's
    section) and the training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if bits:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, summary in bits.items():
            ax.scatter(summary["tokens_per_byte"], summary["bits_per_byte"], label=name)
        ax.set_xlabel("tokens per byte (lower: better compression)")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("Held-out text, each model on its own tokenizer")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out_dir / "compression_vs_bits.png", dpi=100)
        plt.close(fig)
        written.append(str(out_dir / "compression_vs_bits.png"))
    names = list(results)
    per_token = results[names[0]]["per_token"]
    # the tokens with the most held-out positions: a bar per token of thousands is no plot
    tokens = sorted(sorted(per_token, key=lambda t: (-per_token[t]["positions"], t))[:PLOT_TOKENS])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(tokens) * len(names) / 2), 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["per_token"][t]["hidden_mse"] for t in tokens]
        ax.bar([x + i * width for x in range(len(tokens))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tokens))], [repr(t) for t in tokens], rotation=60, ha="right")
    ax.set_ylabel("held-out last-layer hidden MSE")
    ax.set_title("Drift from the original model per new token (lower is better)"
                 + (f", the {PLOT_TOKENS} most frequent" if len(per_token) > PLOT_TOKENS else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "drift_per_token.png", dpi=100)
    plt.close(fig)
    written.append(str(out_dir / "drift_per_token.png"))

    if generation:
        from tokdist_ray.eval.generation import MODES

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
        for ax, metric, label in zip(axes, ("bytes_per_step", "bytes_per_s"), ("bytes of text per decode step",
                                                                                  "bytes of text per second")):
            for i, side in enumerate(("original", "expanded")):
                ax.bar([x + 0.4 * i for x in range(len(MODES))], [generation[side][m][metric] for m in MODES], 0.4,
                       label=side)
            ax.set_xticks([x + 0.2 for x in range(len(MODES))], list(MODES))
            ax.set_ylabel(label)
        axes[0].legend()
        fig.suptitle("Generation from held-out prompts (higher is better)")
        fig.tight_layout()
        fig.savefig(out_dir / "generation.png", dpi=100)
        plt.close(fig)
        written.append(str(out_dir / "generation.png"))

    curve = loss_curve
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("Token Distillation loss")
        fig.tight_layout()
        fig.savefig(out_dir / "loss_curve.png", dpi=100)
        plt.close(fig)
        written.append(str(out_dir / "loss_curve.png"))
    return written
