"""Multi-center segmentation data: loaders into `datasets`, validation, preprocessing and the synthetic default."""

from .folder import load_folder_dataset
from .hf_dataset import load_hf_segmentation_dataset
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
    "load_nifti_dataset",
    "processor_target_size",
    "select_centers",
    "validate_pair",
]
