"""PNG plots of a run's training loss and evaluation curves, from its `metrics.jsonl`."""

from __future__ import annotations

import os
from pathlib import Path

from .metrics import read_metrics


def plot_run(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write `loss.png` (training loss and learning rate by step) and `eval.png` (each
    evaluation metric by step, when there are evaluations).

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    train = [r for r in records if r["kind"] == "train" and isinstance(r.get("loss"), (int, float))]
    if train:
        fig, loss_ax = plt.subplots(figsize=(7, 4))
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="loss")
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("training loss", color="tab:blue")
        lr_ax = loss_ax.twinx()
        lr_ax.plot([r["step"] for r in train], [r.get("lr", 0.0) for r in train], color="tab:orange", alpha=0.6)
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        loss_ax.set_title("training loss")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "loss.png")
    evals = [r for r in records if r["kind"] == "eval"]
    keys = [k for k in ("zero_shot_top1", "zero_shot_top5", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5") if any(k in r for r in evals)]
    if evals and keys:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("score")
        ax.set_ylim(0, 1.02)
        ax.legend()
        ax.set_title("evaluation")
        fig.tight_layout()
        fig.savefig(out_dir / "eval.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / "eval.png")
    return written
