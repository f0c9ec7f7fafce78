"""Human-facing output: the progress line, metrics.jsonl, and the loss-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(row: dict[str, Any], total_steps: int, eta_s: float) -> str:
    """One terminal line: step, losses, throughput, lr, images seen, skipped inputs, ETA."""
    parts = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in row.items()
                     if k.startswith("loss/"))
    return (f"step {row['step']}/{total_steps} ({100 * row['step'] / total_steps:.0f}%) "
            f"loss {row['loss']:.4f} [{parts}] "
            f"{row['images_per_s']:.1f} img/s {row['regions_per_s']:.1f} reg/s "
            f"lr {row['lr']:.2e} seen {row['images_seen']} skipped {row['skipped']} "
            f"eta {duration(eta_s)}")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (a resumed run redoes those steps)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Total and per-branch training loss per step (and held-out recall if evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    evals = [r for r in read_metrics(metrics_path) if r.get("eval", {}).get("region_to_text")]
    if not rows:
        return
    curve = len(evals) > 1            # a recall panel once there is more than one evaluation
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7.5, 4.2), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black", linewidth=1.4)
    for key in sorted({k for r in rows for k in r if k.startswith("loss/")}):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key[5:], linewidth=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    title = "training loss"
    if evals:
        last = evals[-1]["eval"]["region_to_text"]
        title += (f"; held-out region→text R@1 {last['recall@1']:.3f} "
                  f"(chance {last['chance@1']:.3f}, {last['candidates']} candidates)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    if curve:
        ax = axes[0][1]
        e_steps = [r["step"] for r in evals]
        for name in ("region_to_text", "text_to_region", "image_to_text"):
            if name in evals[-1]["eval"]:
                ax.plot(e_steps, [r["eval"][name]["recall@1"] for r in evals], marker="o", label=name)
                ax.axhline(evals[-1]["eval"][name]["chance@1"], linestyle=":", linewidth=0.8,
                           color=ax.lines[-1].get_color())
        ax.set_xlabel("step")
        ax.set_ylabel("held-out recall@1 (dotted: chance)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
