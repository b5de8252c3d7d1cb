"""The report's plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_histograms(cosines_by_system: dict[str, np.ndarray], grades: np.ndarray, path: Path) -> None:
    """One panel per encoder: cosine histograms of the judged pairs per grade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cosines_by_system), figsize=(4.5 * len(cosines_by_system), 3.4), squeeze=False)
    for ax, (name, cosines) in zip(axes[0], cosines_by_system.items()):
        for grade, label, color in ((0, "irrelevant", "tab:red"), (1, "partial", "tab:orange"), (2, "exact", "tab:green")):
            if (grades == grade).any():
                ax.hist(cosines[grades == grade], bins=40, range=(-0.2, 1.0), alpha=0.55, density=True, label=label, color=color)
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
