"""PNG figures of an evaluation: the center x center Dice heatmap and prediction overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .matrix import CenterMatrix  # noqa: E402


def plot_dice_heatmap(matrix: CenterMatrix, path: str | Path) -> Path:
    """Rows (models) x test centers heatmap of mean foreground Dice, annotated, with the adapted cells outlined."""
    values = matrix.dice_array()
    height = 1.0 + 0.5 * len(matrix.rows)
    figure, axes = plt.subplots(figsize=(1.6 + 1.3 * len(matrix.centers), height))
    image = axes.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    axes.set_xticks(range(len(matrix.centers)), matrix.centers, rotation=30, ha="right")
    axes.set_yticks(range(len(matrix.rows)), [row.name for row in matrix.rows])
    axes.set_xlabel("test center")
    for i, row in enumerate(matrix.rows):
        for j, center in enumerate(matrix.centers):
            axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w" if values[i, j] < 0.6 else "k")
            if center in row.adapted:
                axes.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    figure.colorbar(image, ax=axes, label="mean foreground Dice")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def plot_overlays(
    images: Sequence[np.ndarray],
    panels: dict[str, Sequence[np.ndarray]],
    titles: Sequence[str],
    path: str | Path,
    num_labels: int,
) -> Path:
    """One row per image: the image, then each named label map (e.g. reference, base, adapter) drawn over it.

    `images` are (H, W) or (H, W, 3) arrays in any range (rescaled for display); `panels` maps a column title to one
    label map per image.
    """
    columns = ["image", *panels]
    figure, axes = plt.subplots(
        len(images), len(columns), figsize=(2.2 * len(columns), 2.2 * len(images)), squeeze=False
    )
    colours = plt.get_cmap("tab10", max(num_labels, 2))
    for i, image in enumerate(images):
        image = np.asarray(image, dtype=np.float32)
        image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray")
            if column != "image":
                labels = np.asarray(panels[column][i])
                overlay = colours(labels % 10)
                overlay[..., 3] = np.where(labels > 0, 0.45, 0.0)
                ax.imshow(overlay)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(column, fontsize=9)
        axes[i, 0].set_ylabel(titles[i], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
