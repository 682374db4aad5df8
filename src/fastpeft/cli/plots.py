"""Training plots (matplotlib, Agg backend): loss per step with epoch means, optionally accuracy per epoch."""

from __future__ import annotations

from pathlib import Path

PLOT_FILE = "loss_curve.png"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loss_panel(ax, step_losses: list[float], epoch_losses: list[float], steps_per_epoch: list[int]) -> None:
    steps = range(1, len(step_losses) + 1)
    ax.plot(steps, step_losses, color="tab:blue", alpha=0.6, linewidth=1, label="loss per step")
    ends = [sum(steps_per_epoch[: i + 1]) for i in range(len(steps_per_epoch))]
    ax.plot(ends, epoch_losses, "o-", color="tab:orange", label="epoch mean")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()


def _accuracy_panel(ax, accuracy: list[float]) -> None:
    ax.plot(range(len(accuracy)), [100 * a for a in accuracy], "s-", color="tab:green")
    ax.set_xticks(range(len(accuracy)))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)


def plot_training(path: str | Path, title: str, step_losses: list[float], epoch_losses: list[float],
                  steps_per_epoch: list[int], accuracy: list[float] | None = None) -> Path | None:
    """Write the PNG to ``path``; returns it, or None when matplotlib is missing or there is nothing to
    plot."""
    plt = _pyplot()
    if plt is None or not step_losses:
        return None
    panels = 2 if accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    _loss_panel(axes[0][0], step_losses, epoch_losses, steps_per_epoch)
    if accuracy:
        _accuracy_panel(axes[0][1], accuracy)
    fig.suptitle(title)
    fig.tight_layout()
    from ..checkpoint import atomic

    try:  # temp file + fsync + rename: a crash never leaves a torn PNG
        atomic.write_files([(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))])
    finally:
        plt.close(fig)
    return Path(path)
