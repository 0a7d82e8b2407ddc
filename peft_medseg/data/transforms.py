"""Preprocessing that matches the base model's image processor, and training augmentation, for `set_transform`.

Torch, numpy and Pillow only (torchvision is not installable next to every torch build).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from datasets import DatasetDict
from PIL import Image

# Columns copied unchanged from the dataset row to the transformed example, when present.
PASSTHROUGH_COLUMNS = ("center", "case_id", "id", "slice_index", "spacing")


@dataclass
class AugmentationConfig:
    """Random training augmentation, applied after resizing, before normalisation (intensities in [0, 1])."""

    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotation_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_fraction: float = 0.05
    # Additive shift, in units of the [0, 1] intensity range.
    brightness: float = 0.1
    # Contrast factor drawn from [1 - contrast, 1 + contrast], applied around the image mean.
    contrast: float = 0.2
    # Gamma drawn from [1 - gamma, 1 + gamma]: a mild non-linear intensity change, as between scanners.
    gamma: float = 0.2


def _size_value(size, key: str):
    value = size.get(key) if hasattr(size, "get") else None
    return value if value is not None else getattr(size, key, None)


def processor_target_size(image_processor) -> tuple[int, int]:
    """(height, width) images are resized to: `size` {"height", "width"}, or a square of side `shortest_edge`.

    A `shortest_edge` processor is read as a square resize (not resize-then-crop): segmentation must keep the whole
    field of view, and a batch of differently shaped images must stack.
    """
    size = image_processor.size
    height, width = _size_value(size, "height"), _size_value(size, "width")
    if height and width:
        return int(height), int(width)
    shortest = _size_value(size, "shortest_edge")
    if shortest:
        return int(shortest), int(shortest)
    raise ValueError(f"image processor size {size!r}: expected {{'height', 'width'}} or {{'shortest_edge'}}.")


def _to_array(image) -> np.ndarray:
    # PIL images of any mode and numpy arrays (H, W), (H, W, C) become numpy, keeping the dtype.
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "1"):
            image = image.convert("RGB" if image.mode != "1" else "L")
        return np.array(image)
    return np.asarray(image)


def _to_unit_range(array: np.ndarray, rescale_factor: float | None) -> np.ndarray:
    # 8-bit images follow the processor's rescale; anything else (float or 16-bit, e.g. MRI/CT slices) has no
    # agreed white point, so it is scaled by its own 0.5th..99.5th percentiles.
    if array.dtype == np.uint8 or array.dtype == bool:
        return array.astype(np.float32) * (rescale_factor if rescale_factor is not None else 1.0 / 255.0)
    array = array.astype(np.float32)
    low, high = np.percentile(array, [0.5, 99.5])
    if high <= low:
        return np.zeros_like(array)
    return np.clip((array - low) / (high - low), 0.0, 1.0)


def _resize_channels(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    channels = [
        np.array(
            Image.fromarray(np.ascontiguousarray(array[..., c], dtype=np.float32), mode="F").resize(
                (width, height), resample
            )
        )
        for c in range(array.shape[2])
    ]
    return np.stack(channels, axis=-1)


def _resize_uint8(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    resized = np.array(image.resize((width, height), resample))
    return resized[..., None] if resized.ndim == 2 else resized


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if labels.shape == (height, width):
        return labels
    resized = Image.fromarray(labels.astype(np.int32), mode="I").resize((width, height), Image.Resampling.NEAREST)
    return np.array(resized)


class SegmentationTransform:
    """Turn dataset rows (`image`, `label`) into model inputs, for `dataset.set_transform(transform)`.

    Reads the resize target, resampling filter, rescale factor, mean and std from a transformers image processor.
    Each example becomes `pixel_values` (float tensor (3, H, W); grayscale is repeated to 3 channels) and `labels`
    (long tensor (H, W), resized with nearest neighbour), plus the `PASSTHROUGH_COLUMNS` present in the row.
    With `train=True`, random flips, a small affine warp and intensity/contrast/gamma jitter are applied. With a
    `seed`, a dataset row's augmentation depends only on (seed, epoch, center/id of the row) — not on a stream shared
    by the process — so it is the same in a batch of 4 on one process or of 2 on each of two, in any DataLoader
    worker, and a run resumed mid-epoch sees exactly the augmentations of an uninterrupted one. Call `set_epoch`
    each epoch.
    """

    def __init__(
        self,
        image_processor,
        train: bool = False,
        augmentation: AugmentationConfig | None = None,
        seed: int | None = None,
        size: tuple[int, int] | None = None,
    ):
        self.size = tuple(size) if size is not None else processor_target_size(image_processor)
        self.resample = getattr(image_processor, "resample", None) or Image.Resampling.BILINEAR
        self.rescale_factor = (
            float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else 1.0
        )
        if getattr(image_processor, "do_normalize", True):
            self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
            self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).reshape(-1, 1, 1)
        else:
            self.mean, self.std = torch.zeros(3, 1, 1), torch.ones(3, 1, 1)
        self.train = train
        self.augmentation = augmentation or AugmentationConfig()
        self.seed = seed
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations (with a seed, each epoch augments every row differently)."""
        self.epoch = epoch

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _augment(self, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.augmentation
        if self._uniform(0, 1) < config.hflip_prob:
            image, labels = image.flip(-1), labels.flip(-1)
        if self._uniform(0, 1) < config.vflip_prob:
            image, labels = image.flip(-2), labels.flip(-2)

        angle = math.radians(self._uniform(-config.rotation_degrees, config.rotation_degrees))
        scale = self._uniform(*config.scale_range)
        shift_x = self._uniform(-config.translate_fraction, config.translate_fraction) * 2
        shift_y = self._uniform(-config.translate_fraction, config.translate_fraction) * 2
        # affine_grid maps output to input coordinates, so zooming in by `scale` samples a grid shrunk by 1/scale.
        theta = torch.tensor(
            [
                [math.cos(angle) / scale, -math.sin(angle) / scale, shift_x],
                [math.sin(angle) / scale, math.cos(angle) / scale, shift_y],
            ],
            dtype=torch.float32,
        )
        grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        labels = F.grid_sample(
            labels[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        labels = labels[0, 0].long()

        mean = image.mean()
        contrast = self._uniform(1 - config.contrast, 1 + config.contrast)
        brightness = self._uniform(-config.brightness, config.brightness)
        gamma = self._uniform(1 - config.gamma, 1 + config.gamma)
        image = ((image - mean) * contrast + mean + brightness).clamp(0.0, 1.0) ** gamma
        return image, labels

    def transform_example(self, image, label) -> dict[str, torch.Tensor]:
        """One image (PIL or numpy) and label map into `pixel_values` (3, H, W) and `labels` (H, W)."""
        array = _to_array(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"image of shape {array.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).")
        array = array[..., :3]
        labels = _to_array(label)
        if labels.ndim != 2:
            raise ValueError(f"label of shape {labels.shape}: expected a 2D map of class ids.")
        if labels.shape != array.shape[:2]:
            raise ValueError(f"label size {labels.shape} differs from image size {array.shape[:2]}.")
        if array.dtype == np.uint8:
            # Resize 8-bit images as 8-bit, exactly as the image processor does, then rescale.
            array = _resize_uint8(array, self.size, self.resample)
            array = _to_unit_range(array, self.rescale_factor)
        else:
            array = _resize_channels(_to_unit_range(array, self.rescale_factor), self.size, self.resample)
        pixel_values = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
        if pixel_values.shape[0] == 1:
            pixel_values = pixel_values.repeat(3, 1, 1)
        labels = torch.from_numpy(_resize_labels(labels, self.size).astype(np.int64))
        if self.train:
            pixel_values, labels = self._augment(pixel_values, labels)
        pixel_values = (pixel_values - self.mean) / self.std
        return {"pixel_values": pixel_values, "labels": labels}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        outputs: dict[str, list] = {"pixel_values": [], "labels": []}
        per_sample_seed = self.train and self.seed is not None
        # Ids are unique within a center only (the synthetic centers share file names).
        ids = batch.get("id") or batch.get("case_id") or [str(i) for i in range(len(batch["image"]))]
        keys = [f"{center}/{i}" for center, i in zip(batch.get("center") or [""] * len(ids), ids)]
        for key, image, label in zip(keys, batch["image"], batch["label"]):
            if per_sample_seed:
                digest = hashlib.sha1(f"{self.seed}/{self.epoch}/{key}".encode()).digest()
                self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            example = self.transform_example(image, label)
            outputs["pixel_values"].append(example["pixel_values"])
            outputs["labels"].append(example["labels"])
        for column in PASSTHROUGH_COLUMNS:
            if column in batch:
                outputs[column] = list(batch[column])
        return outputs


def collate_segmentation(batch: list[dict]) -> dict:
    """Collate transformed examples: stack `pixel_values` and `labels`, keep every other field as a list."""
    collated = {
        "pixel_values": torch.stack([example["pixel_values"] for example in batch]),
        "labels": torch.stack([example["labels"] for example in batch]),
    }
    for key in batch[0]:
        if key not in collated:
            collated[key] = [example[key] for example in batch]
    return collated


def apply_transforms(
    dataset: DatasetDict,
    image_processor,
    seed: int | None = None,
    augmentation: AugmentationConfig | None = None,
    train_split: str = "train",
) -> DatasetDict:
    """`set_transform` on every split, in place: augmentation on `train_split` only. Returns the same object."""
    for name, split in dataset.items():
        is_train = name == train_split
        split.set_transform(
            SegmentationTransform(image_processor, train=is_train, augmentation=augmentation, seed=seed)
        )
    return dataset
