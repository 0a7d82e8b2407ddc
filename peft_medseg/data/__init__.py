"""Multi-center segmentation data: loaders into `datasets`, validation, preprocessing and the synthetic default."""

from .folder import load_folder_dataset
from .hf_dataset import load_hf_segmentation_dataset
from .multicenter import IGNORE_INDEX, SYNTHETIC, load_multicenter_dataset, parse_label_map
from .nifti import load_nifti_dataset
from .splits import center_names, few_shot_subset, hash_split, select_centers
from .transforms import (
    AugmentationConfig,
    SegmentationTransform,
    apply_transforms,
    collate_segmentation,
    processor_target_size,
)
from .validation import DataValidationError, validate_pair

__all__ = [
    "IGNORE_INDEX",
    "SYNTHETIC",
    "AugmentationConfig",
    "DataValidationError",
    "SegmentationTransform",
    "apply_transforms",
    "center_names",
    "collate_segmentation",
    "few_shot_subset",
    "hash_split",
    "load_folder_dataset",
    "load_hf_segmentation_dataset",
    "load_multicenter_dataset",
    "load_nifti_dataset",
    "parse_label_map",
    "processor_target_size",
    "select_centers",
    "validate_pair",
]
