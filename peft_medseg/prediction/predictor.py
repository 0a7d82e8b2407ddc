"""From scans to masks with one frozen base and its center adapters: one adapter, or routing per scan.

`Predictor` loads the base once, every adapter onto it (peft, each under its own name) and, for `route="auto"`, their
center signatures into a `CenterRouter`. Scans of several centers go through one mixed batch: each row carries its
adapter name (`"__base__"` for the base). A 2D model segments a volume slice by slice (the last axis, as the NIfTI
loader slices for training), and routes it as a whole by the mean of its slices' features. Masks come back at the scan's
own size: logits are resized to it before the argmax.

A 3D base (MONAI's UNETR / Swin UNETR) segments a volume whole: its `VolumePreprocessing` (RAS orientation, voxel
size, per-channel z-score) is applied with MONAI, sliding-window inference gives class probabilities, and MONAI's
recorded inverse maps them back onto the scan's own voxels before the argmax, so the mask has the scan's shape and
affine. Routed (`route="auto"`), a volume goes by the base's features of its central patch of the model's size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from torch import nn

from ..data import SegmentationTransform
from ..data.volumes import volume_input_transform
from ..models import model_num_labels
from ..models3d import VolumePreprocessing
from ..routing import CenterRouter, Routes, base_features, volume_routing_input
from ..scoring import volume_logits
from ..storage import check_safe_name, is_adapter_folder, load_base
from ..visual_prompt import BASE_ADAPTER_NAME
from .scans import Scan, check_mask_format

AUTO = "auto"


@dataclass
class Prediction:
    """A scan's mask (image: (H, W); volume: (X, Y, Z)) and how it was routed."""

    scan: Scan
    mask: np.ndarray
    route: str  # the adapter used, or "__base__"
    nearest: str | None = None  # the router's nearest center (also when it rejected)
    distance: float | None = None  # the router's distance to it
    calibrated_distance: float | None = None  # distance / that center's threshold (> 1: rejected)


def expand_adapters(adapters: Sequence[str | Path]) -> dict[str, str]:
    """`{name: path or Hub id}`: adapter folders, Hub ids, and folders whose subfolders are adapters (one each).

    Names are folder names (or the last part of a Hub id), checked like every name that comes from data.
    """
    found: dict[str, str] = {}
    for adapter in adapters:
        path = Path(adapter).expanduser()
        if path.is_dir() and not is_adapter_folder(path):
            children = sorted(p for p in path.iterdir() if is_adapter_folder(p))
            if not children:
                raise FileNotFoundError(f"{path}: neither an adapter folder nor a folder of adapter folders.")
            entries = [(p.name, str(p)) for p in children]
        else:
            entries = [(path.name if path.is_dir() else str(adapter).rstrip("/").split("/")[-1], str(adapter))]
        for name, location in entries:
            check_safe_name(name, f"{location}: adapter name")
            if name in found or name == BASE_ADAPTER_NAME:
                raise ValueError(f"{location}: adapter name {name!r} is used twice (or reserved); rename a folder.")
            found[name] = location
    return found


class Predictor:
    """A base model with its center adapters, turning scans into masks.

    Args:
        base_model: Folder or Hub id of the base (with its image processor).
        adapters: Adapter folders / Hub ids / folders of adapters (see `expand_adapters`); none: the base alone.
        route: An adapter name to use for every scan, `"__base__"`, or `"auto"` (routing by center signatures;
            each adapter needs its `center_signature.safetensors`, made with this base).
        batch_size: Images (or slices) per forward pass; rows of different centers share a pass.
    """

    def __init__(
        self,
        base_model: str | Path,
        adapters: Sequence[str | Path] = (),
        route: str | None = None,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
    ):
        self.adapters = expand_adapters(adapters)
        if route is None:
            if len(self.adapters) > 1:
                raise ValueError(
                    f"{len(self.adapters)} adapters given: choose one with route=NAME or route by center ('auto')."
                )
            route = next(iter(self.adapters), BASE_ADAPTER_NAME)
        if route not in (AUTO, BASE_ADAPTER_NAME, *self.adapters):
            raise ValueError(
                f"route {route!r}: expected 'auto', {BASE_ADAPTER_NAME!r} or one of {list(self.adapters)}."
            )
        if route == AUTO and not self.adapters:
            raise ValueError("route 'auto' needs adapters to route between.")
        self.route, self.batch_size = route, batch_size
        # Everything is read and checked before any prediction: signatures first (small), then the models.
        self.router = CenterRouter.from_adapters(self.adapters) if route == AUTO else None
        base, self.processor = load_base(base_model)
        self.volumes = isinstance(self.processor, VolumePreprocessing)
        if self.router is not None:
            self.router.check_base(base)  # against the bare base, before any adapter is injected
        self.model = load_adapters(base, self.adapters).to(device).eval()
        self.device = torch.device(device)
        self.num_labels = model_num_labels(base)
        id2label = self.processor.id2label if self.volumes else base.config.id2label
        self.id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        check_mask_format(self.num_labels)
        if self.volumes:
            self.volume_transform = volume_input_transform(self.processor)
        else:
            self.transform = SegmentationTransform(self.processor, train=False)

    @property
    def centers(self) -> list[str]:
        """The adapter names, in the order given."""
        return list(self.adapters)

    def _pixel_values(self, image: np.ndarray) -> torch.Tensor:
        label = np.zeros(image.shape[:2], dtype=np.int64)
        if image.ndim == 3 and image.shape[2] not in (1, 3, 4):
            raise ValueError(f"image with {image.shape[2]} channels; a 2D model takes 1 (gray) or 3 (RGB).")
        return self.transform.transform_example(image, label)["pixel_values"]

    def _slices(self, scan: Scan) -> list[np.ndarray]:
        """The 2D images the model sees: the image itself, or each slice (last axis) of a volume, channels last."""
        if not scan.is_volume:
            return [scan.array]
        channels = scan.array.shape[0]
        if channels not in (1, 3):
            raise ValueError(
                f"{scan.input.source}: a volume with {channels} channels; this 2D model takes 1 (gray) or 3 channels."
            )
        volume = scan.array if channels == 3 else scan.array[0]
        if channels == 3:
            return [np.ascontiguousarray(volume[..., z].transpose(1, 2, 0)) for z in range(volume.shape[-1])]
        return [np.ascontiguousarray(volume[..., z]) for z in range(volume.shape[-1])]

    @torch.no_grad()
    def predict(self, scans: Sequence[Scan], route: str | None = None) -> list[Prediction]:
        """Masks for `scans`, routed per scan (or all through `route`, overriding the predictor's), in batches that mix
        centers."""
        route = route or self.route
        if route not in (AUTO, BASE_ADAPTER_NAME, *self.adapters) or route == AUTO and self.router is None:
            raise ValueError(f"route {route!r}: this predictor offers {self.routes}.")
        if self.volumes:
            return [self._volume_prediction(scan, route) for scan in scans]
        slices = [self._slices(scan) for scan in scans]
        owners = [i for i, group in enumerate(slices) for _ in group]
        images = [image for group in slices for image in group]
        pixel_values = [self._pixel_values(image) for image in images]
        routes = self._routes(pixel_values, owners, len(scans), route)
        masks: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(images)))
            batch = torch.stack([pixel_values[i] for i in rows]).to(self.device)
            names = [routes[owners[i]]["route"] for i in rows]
            masks += self._masks(batch, names, [images[i].shape[:2] for i in rows])
        predictions = []
        for index, scan in enumerate(scans):
            mine = [m for m, owner in zip(masks, owners) if owner == index]
            mask = np.stack(mine, axis=-1) if scan.is_volume else mine[0]
            predictions.append(Prediction(scan, mask, **routes[index]))
        return predictions

    @property
    def routes(self) -> list[str]:
        """What `predict(route=...)` accepts: "auto" (with signatures), each adapter, and "__base__"."""
        return ([AUTO] if self.router is not None else []) + self.centers + [BASE_ADAPTER_NAME]

    def _routes(self, pixel_values: list[torch.Tensor], owners: list[int], num_scans: int, route: str) -> list[dict]:
        if route != AUTO:
            return [{"route": route} for _ in range(num_scans)]
        features = torch.cat(
            [
                base_features(self.model, torch.stack(pixel_values[s : s + self.batch_size]).to(self.device)).cpu()
                for s in range(0, len(pixel_values), self.batch_size)
            ]
        )
        # A volume is routed as a whole: the mean over its slices of the features, so all slices take one adapter.
        owner_index = torch.tensor(owners)
        per_scan = torch.stack([features[owner_index == i].mean(dim=0) for i in range(num_scans)])
        return _route_records(self.router.route_features(per_scan))

    def _masks(self, batch: torch.Tensor, names: list[str], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        kwargs = {"adapter_names": names} if self.adapters else {}
        logits = self.model(pixel_values=batch, **kwargs).logits
        masks = []
        for row, size in zip(logits, sizes):
            row = torch.nn.functional.interpolate(row[None].float(), size=tuple(size), mode="bilinear")
            masks.append(row[0].argmax(dim=0).to(torch.uint8).cpu().numpy())
        return masks

    def _volume_prediction(self, scan: Scan, route: str) -> Prediction:
        """A 3D model's mask of a whole volume on the scan's own voxels (X, Y, Z); with `route="auto"` the volume is
        routed by its central patch (`volume_routing_input`) first."""
        if not scan.is_volume:
            raise ValueError(f"{scan.input.source}: a 2D image; this 3D base segments volumes.")
        if scan.array.shape[0] != self.processor.num_channels:
            raise ValueError(
                f"{scan.input.source}: {scan.array.shape[0]} channels; this base takes {self.processor.num_channels}."
            )
        image = MetaTensor(torch.as_tensor(scan.array, dtype=torch.float32), affine=torch.as_tensor(scan.affine))
        prepared = self.volume_transform(image)
        routed = {"route": route}
        if route == AUTO:
            patch = volume_routing_input(self.model, prepared.as_tensor()).to(self.device)
            routed = _route_records(self.router.route_features(base_features(self.model, patch).cpu()))[0]
        name = routed["route"] if self.adapters else None
        logits = volume_logits(
            self.model, prepared.as_tensor().to(self.device), name, self.processor.sliding_window_overlap
        )
        probabilities = MetaTensor(logits.softmax(dim=0).cpu(), affine=prepared.affine)
        probabilities.applied_operations = prepared.applied_operations
        restored = self.volume_transform.inverse(probabilities)
        return Prediction(scan, restored.argmax(dim=0).to(torch.uint8).numpy(), **routed)

    def iter_batches(self, scans: Sequence) -> Iterator[list]:
        """`scans` in groups of `batch_size`, one `predict` call each."""
        for start in range(0, len(scans), self.batch_size):
            yield list(scans[start : start + self.batch_size])


def _route_records(routes: Routes) -> list[dict]:
    """Per routed scan, the `Prediction` fields of its route: the adapter used, the nearest center and distances."""
    return [
        {"route": name, "nearest": near, "distance": dist, "calibrated_distance": cal}
        for name, near, dist, cal in zip(routes.adapter_names, routes.nearest, routes.distances, routes.calibrated)
    ]


def load_adapters(base: nn.Module, adapters: Mapping[str, str | Path]) -> nn.Module:
    """The base with every adapter (`{name: folder or Hub id}`) loaded under its name, each checked against the
    base as peft loads it; the base itself when there are none."""
    if not adapters:
        return base
    from peft import PeftModel

    model = None
    for name, location in adapters.items():
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(location), adapter_name=name)
            else:
                model.load_adapter(str(location), adapter_name=name)
        except (ValueError, RuntimeError, OSError) as error:
            raise ValueError(f"{location}: cannot load this adapter onto the base ({error}).") from error
    return model
