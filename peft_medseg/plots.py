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


def label_colours(num_labels: int) -> np.ndarray:
    """(num_labels, 4) RGBA colour of each class in overlays (class 0, the background, is transparent)."""
    colours = plt.get_cmap("tab10")(np.arange(max(num_labels, 1)) % 10)
    colours[0, 3] = 0.0
    return colours


def overlay_image(image: np.ndarray, mask: np.ndarray, num_labels: int, alpha: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the image in gray (or its colours), rescaled to its range, with each class painted over it."""
    image = np.asarray(image, dtype=np.float32)
    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    image = np.clip((image - low) / max(float(high - low), 1e-6), 0, 1)
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    colours = label_colours(num_labels)
    painted = colours[np.clip(mask, 0, num_labels - 1)]
    weight = np.where(mask > 0, alpha, 0.0)[..., None]
    return ((1 - weight) * rgb + weight * painted[..., :3]).clip(0, 1).__mul__(255).astype(np.uint8)


def plot_mask_overlay(
    image: np.ndarray, mask: np.ndarray, id2label: dict[int, str], path: str | Path, title: str = ""
) -> Path:
    """A PNG of `mask` over `image` with a legend naming each class's colour."""
    num_labels = max(len(id2label), int(mask.max()) + 1, 2)
    figure, axes = plt.subplots(figsize=(5, 5.4))
    axes.imshow(overlay_image(image, mask, num_labels))
    axes.set_axis_off()
    axes.set_title(title, fontsize=9)
    colours = label_colours(num_labels)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=colours[label][:3], label=id2label.get(label, str(label)))
        for label in range(1, num_labels)
    ]
    axes.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.1), ncol=min(4, len(handles)), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)
