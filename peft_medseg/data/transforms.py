"""Preprocessing that matches the base model's image processor, and training augmentation, as MONAI dictionary
transforms (`Compose` of `...d` transforms on `{"image", "label"}`) for `set_transform`.

The deterministic part reproduces a transformers image processor (resize, rescale, normalise); augmentation uses
MONAI's random transforms, seeded per sample so that a run is reproducible and resumable anywhere.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from datasets import DatasetDict
from monai.config import KeysCollection
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    Randomizable,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
)
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


def image_to_array(image) -> np.ndarray:
    """PIL images of any mode (palette, alpha, CMYK, ... as RGB; 1-bit as L) and (H, W[, C]) arrays as numpy,
    keeping the dtype."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "P", "CMYK", "YCbCr", "1"):
            image = image.convert("RGB" if image.mode != "1" else "L")
        return np.array(image)
    return np.asarray(image)


class ToChannelFirstd(MapTransform):
    """PIL images or (H, W[, C]) arrays to channel-first arrays: the image (C, H, W) with C in 1..3 (alpha dropped),
    the label (1, H, W) of class ids. Shapes are checked here, with errors naming what was found."""

    def __init__(self, keys: KeysCollection = ("image", "label")) -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        image, label = image_to_array(data["image"]), image_to_array(data["label"])
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"image of shape {image.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).")
        if label.ndim != 2:
            raise ValueError(f"label of shape {label.shape}: expected a 2D map of class ids.")
        if label.shape != image.shape[:2]:
            raise ValueError(f"label size {label.shape} differs from image size {image.shape[:2]}.")
        data["image"] = np.ascontiguousarray(image[..., :3].transpose(2, 0, 1))
        data["label"] = label.astype(np.int64)[None]
        return data


class ProcessorResized(MapTransform):
    """Resize to the image processor's size exactly as it does: Pillow, its resampling filter, 8-bit images resized
    as 8-bit; labels with nearest neighbour (no interpolated class ids)."""

    def __init__(self, size: tuple[int, int], resample, keys: KeysCollection = ("image", "label")) -> None:
        super().__init__(keys)
        self.size, self.resample = tuple(size), resample

    def _resize(self, channels: np.ndarray, resample) -> np.ndarray:
        if channels.shape[1:] == self.size:
            return channels
        height, width = self.size
        if channels.dtype == np.uint8 and channels.shape[0] in (1, 3):
            image = Image.fromarray(channels[0] if channels.shape[0] == 1 else channels.transpose(1, 2, 0))
            resized = np.array(image.resize((width, height), resample))
            return resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
        mode, dtype = ("I", np.int32) if channels.dtype.kind in "iu" else ("F", np.float32)
        return np.stack(
            [np.array(Image.fromarray(c.astype(dtype), mode=mode).resize((width, height), resample)) for c in channels]
        )

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        data["image"] = self._resize(data["image"], self.resample)
        data["label"] = self._resize(data["label"], Image.Resampling.NEAREST).astype(np.int64)
        return data


class RescaleToUnitd(MapTransform):
    """Intensities into [0, 1]: 8-bit images by the processor's rescale factor; anything else (float or 16-bit, e.g.
    MRI/CT slices) has no agreed white point, so it is scaled by its own 0.5th..99.5th percentiles."""

    def __init__(self, rescale_factor: float, keys: KeysCollection = "image") -> None:
        super().__init__(keys)
        self.rescale_factor = rescale_factor

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        image = data["image"]
        if image.dtype in (np.uint8, bool):
            data["image"] = image.astype(np.float32) * self.rescale_factor
            return data
        image = image.astype(np.float32)
        low, high = np.percentile(image, [0.5, 99.5])
        if high <= low:
            data["image"] = np.zeros_like(image)
        else:
            data["image"] = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(image)
        return data


class RepeatToRGBd(MapTransform):
    """Grayscale (1, H, W) images repeated to three channels, as RGB backbones expect."""

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        if data["image"].shape[0] == 1:
            data["image"] = np.repeat(data["image"], 3, axis=0)
        return data


class ToModelInputsd(MapTransform):
    """The final `pixel_values` (float32 (3, H, W)) and `labels` (long (H, W)) tensors, as plain torch tensors."""

    def __init__(self, keys: KeysCollection = ("image", "label")) -> None:
        super().__init__(keys)

    def __call__(self, data: dict) -> dict:
        image, label = data["image"], data["label"]
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        label = label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)
        return {"pixel_values": image.float().contiguous(), "labels": label[0].round().long().contiguous()}


def augmentation_transforms(config: AugmentationConfig, size: tuple[int, int]) -> list:
    """MONAI's random transforms for `config`, on intensities in [0, 1]: flips, one affine warp of image and label
    (bilinear / nearest), then contrast around the mean, brightness, clipping and gamma on the image."""
    keys = ("image", "label")
    return [
        RandFlipd(keys, prob=config.hflip_prob, spatial_axis=1),
        RandFlipd(keys, prob=config.vflip_prob, spatial_axis=0),
        RandAffined(
            keys,
            prob=1.0,
            rotate_range=math.radians(config.rotation_degrees),
            scale_range=(config.scale_range[0] - 1.0, config.scale_range[1] - 1.0),
            translate_range=(config.translate_fraction * size[0], config.translate_fraction * size[1]),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            spatial_size=size,
            cache_grid=True,  # every row has the processor's size: build the sampling grid once
        ),
        RandScaleIntensityFixedMeand("image", factors=config.contrast, prob=1.0),
        RandShiftIntensityd("image", offsets=config.brightness, prob=1.0),
        ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        RandAdjustContrastd("image", gamma=(1.0 - config.gamma, 1.0 + config.gamma), prob=1.0),
    ]


class SegmentationTransform:
    """Turn dataset rows (`image`, `label`) into model inputs, for `dataset.set_transform(transform)`.

    `pipeline` is a MONAI `Compose` of dictionary transforms: channel-first arrays, the image processor's resize
    (its target size and resampling filter), rescale into [0, 1], grayscale to RGB, then with `train=True` MONAI's
    random flips, affine warp and intensity/contrast/gamma jitter (`AugmentationConfig`), then the processor's
    normalisation. `extra_transforms` (MONAI dictionary transforms on `image`/`label`, intensities in [0, 1]) run
    after the augmentation, before normalisation. Each example becomes `pixel_values` (float tensor (3, H, W)) and
    `labels` (long tensor (H, W)), plus the `PASSTHROUGH_COLUMNS` present in the row.

    With a `seed`, a dataset row's augmentation depends only on (seed, epoch, center/id of the row): `__call__`
    seeds every random transform for each row (`seed_augmentation`) — not a stream shared by the process —
    so it is the same in a batch of 4 on one process or of 2 on each of two, in any DataLoader worker, and a run
    resumed mid-epoch sees exactly the augmentations of an uninterrupted one. Call `set_epoch` each epoch.
    """

    def __init__(
        self,
        image_processor,
        train: bool = False,
        augmentation: AugmentationConfig | None = None,
        seed: int | None = None,
        size: tuple[int, int] | None = None,
        extra_transforms: Sequence = (),
    ):
        self.size = tuple(size) if size is not None else processor_target_size(image_processor)
        resample = getattr(image_processor, "resample", None) or Image.Resampling.BILINEAR
        rescale_factor = float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True) else 1.0
        if getattr(image_processor, "do_normalize", True):
            mean, std = list(image_processor.image_mean), list(image_processor.image_std)
        else:
            mean, std = [0.0] * 3, [1.0] * 3
        self.train = train
        self.augmentation = augmentation or AugmentationConfig()
        self.seed = seed
        self.epoch = 0
        random_part = augmentation_transforms(self.augmentation, self.size) if train else []
        self.pipeline = Compose(
            [
                ToChannelFirstd(),
                ProcessorResized(self.size, resample),
                RescaleToUnitd(rescale_factor),
                RepeatToRGBd(),
                *random_part,
                *extra_transforms,
                NormalizeIntensityd("image", subtrahend=np.array(mean), divisor=np.array(std), channel_wise=True),
                ToModelInputsd(),
            ]
        )
        if seed is not None:
            self.seed_augmentation(seed)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations (with a seed, each epoch augments every row differently)."""
        self.epoch = epoch

    def transform_example(self, image, label) -> dict[str, torch.Tensor]:
        """One image (PIL or numpy) and label map into `pixel_values` (3, H, W) and `labels` (H, W)."""
        tracking = get_track_meta()
        # MONAI's metadata (affines, applied operations) is not needed for 2D rows and costs twice the transform.
        set_track_meta(False)
        try:
            return self.pipeline({"image": image, "label": label})
        except RuntimeError as error:
            # MONAI wraps a transform's error in "applying transform ..."; a bad input keeps its own message.
            cause = error
            while isinstance(cause, RuntimeError) and cause.__cause__ is not None:
                cause = cause.__cause__
            if isinstance(cause, ValueError):
                raise cause from None
            raise
        finally:
            set_track_meta(tracking)

    def seed_augmentation(self, seed: int) -> None:
        """Seed every random transform of the pipeline from one stream (cheaper than `Compose.set_random_state`,
        which builds a generator per transform)."""
        state = np.random.RandomState(seed)
        for transform in self.pipeline.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=state)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        outputs: dict[str, list] = {"pixel_values": [], "labels": []}
        per_sample_seed = self.train and self.seed is not None
        # Ids are unique within a center only (the synthetic centers share file names).
        ids = batch.get("id") or batch.get("case_id") or [str(i) for i in range(len(batch["image"]))]
        keys = [f"{center}/{i}" for center, i in zip(batch.get("center") or [""] * len(ids), ids)]
        for key, image, label in zip(keys, batch["image"], batch["label"]):
            if per_sample_seed:
                digest = hashlib.sha1(f"{self.seed}/{self.epoch}/{key}".encode()).digest()
                self.seed_augmentation(int.from_bytes(digest[:4], "little"))
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
