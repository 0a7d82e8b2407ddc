"""How well center signatures route: accuracy per center, unknown-center rejection, and what routing costs in Dice.

For every test image the router sees the frozen base's features and answers a center or `"__base__"`. Centers with
a signature should be routed to themselves; centers without one are unknown and should be rejected. Each signature
center is also left out in turn (its signature removed) to measure how an unknown center is told apart from the
known ones (AUROC of the smallest calibrated distance) and how many of its images the calibrated threshold rejects.
With adapters, Dice under routing is compared with oracle routing (each image through its own center's adapter, the
base for centers without one) and with the base alone, and an unknown center's Dice through the base with the Dice
it would get through its nearest (wrong) adapter.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ..data import collate_segmentation  # noqa: E402
from ..metrics import dice_per_class  # noqa: E402
from ..models3d import is_volume_model  # noqa: E402
from ..routing import CenterRouter, CenterSignature, base_features, volume_routing_input  # noqa: E402
from ..scoring import predict  # noqa: E402
from ..visual_prompt import BASE_ADAPTER_NAME  # noqa: E402


def auroc(negatives: list[float], positives: list[float]) -> float:
    """Probability that a positive scores above a negative (ties count half): the Mann-Whitney AUROC."""
    if not negatives or not positives:
        return float("nan")
    neg, pos = np.asarray(negatives)[None, :], np.asarray(positives)[:, None]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (neg.size * pos.size))


@torch.no_grad()
def evaluate_routing(
    model: torch.nn.Module,
    signatures: Mapping[str, CenterSignature],
    test: Dataset,
    num_labels: int,
    adapters: Sequence[str] = (),
    batch_size: int = 32,
    groups: Mapping[str, str] | None = None,
) -> dict:
    """Routing on a transformed test split (`pixel_values`, `labels`, `center` rows; whole volumes for a 3D base,
    routed by their central patch and segmented by sliding windows, one at a time).

    `signatures` are keyed by center. `adapters` names the centers that have an adapter in `model` (a peft model,
    adapter name = center); the other signature centers are the base's own and route to the base. With adapters,
    Dice is measured too. `groups` (center -> institution) adds the share of each
    center's images whose nearest signature belongs to its own institution. Returns `{"centers": {center: {...}}, "unknown": {...}}`.
    """
    # Without adapters (routing alone), every signature center stands for an adapter of its own.
    routable = list(adapters) or list(signatures)
    router = CenterRouter(signatures, base_centers=[c for c in signatures if c not in routable])
    model.eval()
    volumes = is_volume_model(model)
    rows: list[dict] = []
    for batch in DataLoader(test, batch_size=1 if volumes else batch_size, collate_fn=collate_segmentation):
        pixel_values = batch["pixel_values"]
        routed_by = volume_routing_input(model, pixel_values[0]) if volumes else pixel_values
        features = base_features(model, routed_by).cpu()
        routes = router.route_features(features)
        record = {
            "center": batch["center"],
            "route": routes.adapter_names,
            "nearest": routes.nearest,
            "calibrated": routes.all_calibrated,
        }
        if adapters:
            oracle = [c if c in adapters else BASE_ADAPTER_NAME for c in batch["center"]]
            nearest_wrong = [
                _nearest_other(row, list(adapters), router.centers, c)
                for row, c in zip(routes.all_calibrated, batch["center"])
            ]
            for name, names in (
                ("routed", routes.adapter_names),
                ("oracle", oracle),
                ("base", [BASE_ADAPTER_NAME] * len(oracle)),
                ("nearest_adapter", nearest_wrong),
            ):
                masks = predict(model, pixel_values, names).numpy()
                record[f"dice_{name}"] = [
                    float(np.nanmean(dice_per_class(m, r, num_labels)[1:]))
                    for m, r in zip(masks, batch["labels"].numpy())
                ]
        for i in range(len(batch["center"])):
            rows.append({key: value[i] for key, value in record.items()})
    return _summarise(rows, router.centers, routable, bool(adapters), groups)


def _nearest_other(calibrated: torch.Tensor, adapters: list[str], centers: list[str], own: str) -> str:
    # The adapter a mistaken router would pick for an unknown center: the nearest center that has an adapter.
    order = calibrated.argsort().tolist()
    return next((centers[i] for i in order if centers[i] != own and centers[i] in adapters), BASE_ADAPTER_NAME)


def _summarise(
    rows: list[dict], known: list[str], routable: list[str], adapters: bool, groups: Mapping[str, str] | None = None
) -> dict:
    centers = sorted({r["center"] for r in rows})
    summary: dict = {"centers": {}, "unknown": {}}
    for center in centers:
        mine = [r for r in rows if r["center"] == center]
        routes = Counter(r["route"] for r in mine)
        entry = {
            "images": len(mine),
            "has_signature": center in known,
            "served_by": center if center in routable else BASE_ADAPTER_NAME,
            # Right: a center with an adapter to its adapter; the base's own centers and unknown ones to the base.
            "correct": routes[center if center in routable else BASE_ADAPTER_NAME] / len(mine),
            "rejected": routes[BASE_ADAPTER_NAME] / len(mine),
            "nearest_is_own": sum(r["nearest"] == center for r in mine) / len(mine),
            "routes": dict(routes),
        }
        if groups and center in groups:
            entry["group"] = groups[center]
            entry["nearest_in_group"] = sum(groups.get(r["nearest"]) == groups[center] for r in mine) / len(mine)
        if adapters:
            for name in ("routed", "oracle", "base", "nearest_adapter"):
                entry[f"dice_{name}"] = statistics.fmean(r[f"dice_{name}"] for r in mine)
        summary["centers"][center] = entry
    # Leave each known center out: its images against the other known centers' images, by the smallest calibrated
    # distance to the remaining signatures.
    for left_out in known:
        others = [i for i, c in enumerate(known) if c != left_out]
        if not others:
            continue
        positives = [float(r["calibrated"][others].min()) for r in rows if r["center"] == left_out]
        negatives = [
            float(r["calibrated"][others].min()) for r in rows if r["center"] in known and r["center"] != left_out
        ]
        summary["unknown"][left_out] = {
            "auroc": auroc(negatives, positives),
            "rejected": float(np.mean([p > 1 for p in positives])) if positives else float("nan"),
            "known_rejected": float(np.mean([n > 1 for n in negatives])) if negatives else float("nan"),
        }
    # Centers that never had a signature are unknown as they stand.
    for center in centers:
        if center not in known:
            positives = [float(r["calibrated"].min()) for r in rows if r["center"] == center]
            negatives = [float(r["calibrated"].min()) for r in rows if r["center"] in known]
            summary["unknown"][center] = {
                "auroc": auroc(negatives, positives),
                "rejected": float(np.mean([p > 1 for p in positives])),
                "known_rejected": float(np.mean([n > 1 for n in negatives])) if negatives else float("nan"),
            }
    summary["confusion"] = {
        center: dict(Counter(r["nearest"] for r in rows if r["center"] == center)) for center in centers
    }
    summary["known"] = known
    return summary


def write_routing_report(summary: dict, output_dir: str | Path, title: str = "") -> str:
    """`routing.md`, `routing.csv` and `routing.png` (nearest-center confusion); returns the Markdown."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    has_dice = any("dice_routed" in e for e in summary["centers"].values())
    has_groups = any("group" in e for e in summary["centers"].values())
    lines = [f"## Routing{': ' + title if title else ''}\n"]
    header = "| test center | signature | images | routed right | rejected to base | nearest is own |"
    header += " nearest in own institution |" if has_groups else ""
    lines.append(header + (" Dice routed | Dice oracle | Dice base |" if has_dice else ""))
    lines.append("|---" * (6 + has_groups + 3 * has_dice) + "|")
    table = []
    for center, e in summary["centers"].items():
        kind = (
            "no (unknown)"
            if not e["has_signature"]
            else "adapter"
            if e["served_by"] != BASE_ADAPTER_NAME
            else "base's own"
        )
        cells = [center, kind, e["images"], f"{e['correct']:.1%}",
                 f"{e['rejected']:.1%}", f"{e['nearest_is_own']:.1%}"]  # fmt: skip
        if has_groups:
            cells.append(f"{e['nearest_in_group']:.1%} ({e['group']})" if "group" in e else "—")
        if has_dice:
            cells += [f"{e['dice_routed']:.3f}", f"{e['dice_oracle']:.3f}", f"{e['dice_base']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
        table.append(dict(zip(["center", "signature", "images", "routed_right", "rejected", "nearest_is_own"], cells)))
    lines.append("\n| unknown center (no signature) | AUROC vs known | rejected at threshold | known rejected |")
    lines.append("|---|---|---|---|")
    for center, u in summary["unknown"].items():
        lines.append(f"| {center} | {u['auroc']:.3f} | {u['rejected']:.1%} | {u['known_rejected']:.1%} |")
    if has_dice:
        lines.append("\n| unknown center | Dice through the base | Dice through its nearest (wrong) adapter |")
        lines.append("|---|---|---|")
        for center, e in summary["centers"].items():
            if not e["has_signature"]:
                lines.append(f"| {center} | {e['dice_base']:.3f} | {e['dice_nearest_adapter']:.3f} |")
    markdown = "\n".join(lines) + "\n"
    (output_dir / "routing.md").write_text(markdown)
    with open(output_dir / "routing.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    _plot_confusion(summary, output_dir / "routing.png", title)
    return markdown


def _plot_confusion(summary: dict, path: Path, title: str) -> None:
    centers = list(summary["centers"])
    known = summary["known"]
    matrix = np.array(
        [[summary["confusion"][c].get(k, 0) / summary["centers"][c]["images"] for k in known] for c in centers]
    )
    figure, axes = plt.subplots(figsize=(1.2 * len(known) + 3, 0.5 * len(centers) + 2))
    image = axes.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
    axes.set_xticks(range(len(known)), known, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(centers)), centers, fontsize=8)
    for i in range(len(centers)):
        for j in range(len(known)):
            axes.text(
                j,
                i,
                f"{matrix[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="k" if matrix[i, j] < 0.6 else "w",
            )
    axes.set_xlabel("nearest signature")
    axes.set_ylabel("test center")
    axes.set_title(f"Nearest center by base features{': ' + title if title else ''}", fontsize=9)
    figure.colorbar(image, ax=axes, label="share of test images")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
