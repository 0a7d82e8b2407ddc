"""Scans in, masks out: reading images/volumes, routing them to a center adapter, writing masks in their geometry."""

from .predictor import AUTO, Prediction, Predictor, expand_adapters, load_adapters
from .scans import Scan, ScanInput, find_scans, read_scan, write_mask
from .writer import PREDICTIONS_CSV, predict_to_folder

__all__ = [
    "AUTO",
    "PREDICTIONS_CSV",
    "Prediction",
    "Predictor",
    "Scan",
    "ScanInput",
    "expand_adapters",
    "find_scans",
    "load_adapters",
    "predict_to_folder",
    "read_scan",
    "write_mask",
]
