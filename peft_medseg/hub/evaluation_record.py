"""Reading the evaluation JSON that the recipes write for a center adapter, with errors that name the file and field.

The expected shape (only `center` and `metrics` are required; one entry in `metrics` per test center):

```json
{
  "center": "B",
  "method": "vpt-deep",
  "base_model": "org/base-segmenter",
  "dataset": "org/multicenter-dataset",
  "trainable_parameters": 2560,
  "total_parameters": 2900000,
  "metrics": {"A": {"dice": 0.81, "hd95": 4.2}, "B": {"dice": 0.86, "hd95": 3.1}},
  "train": {"num_train_cases": 20, "epochs": 50, "learning_rate": 0.001, "seed": 0}
}
```

`dice` is in [0, 1]. `hd95` may be `null`, missing, `Infinity` or `NaN` (for example when a prediction is empty): it
is then reported as not available rather than as a number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _fail(source: str, field: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{source}: field '{field}' must be {expected}, got {value!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_evaluation(data: Any, source: str = "evaluation") -> dict[str, Any]:
    """Check an evaluation dict and return a normalised copy.

    Args:
        data: The parsed evaluation JSON.
        source: How to name the input in error messages, usually its file path.

    Returns:
        A copy where `metrics[center]["hd95"]` is a finite float or `None`, and optional fields are present (`None`
        or `{}` when missing).

    Raises:
        ValueError: naming `source`, the field and the offending value when a field has the wrong type or range.
    """
    if not isinstance(data, dict):
        raise _fail(source, "<root>", "a JSON object", data)
    center = data.get("center")
    if not isinstance(center, str) or not center.strip():
        raise _fail(source, "center", "a non-empty string (the center the adapter was trained on)", center)

    metrics = data.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise _fail(source, "metrics", "a non-empty object mapping each test center to its scores", metrics)
    normalised_metrics: dict[str, dict[str, float | None]] = {}
    for test_center, scores in metrics.items():
        if not isinstance(scores, dict):
            raise _fail(source, f"metrics.{test_center}", "an object with 'dice' and optionally 'hd95'", scores)
        dice = scores.get("dice")
        if not _is_number(dice) or not 0.0 <= dice <= 1.0:
            raise _fail(source, f"metrics.{test_center}.dice", "a number in [0, 1]", dice)
        hd95 = scores.get("hd95")
        if hd95 is not None and not _is_number(hd95):
            raise _fail(source, f"metrics.{test_center}.hd95", "a number, null or absent", hd95)
        if hd95 is not None and not math.isnan(hd95) and hd95 < 0:
            raise _fail(source, f"metrics.{test_center}.hd95", "a non-negative distance", hd95)
        if hd95 is not None and not math.isfinite(hd95):
            hd95 = None  # undefined distance (empty mask): "not available", never a fake number in the card
        normalised_metrics[str(test_center)] = {"dice": float(dice), "hd95": None if hd95 is None else float(hd95)}

    for name in ("method", "base_model", "dataset"):
        value = data.get(name)
        if value is not None and not isinstance(value, str):
            raise _fail(source, name, "a string or absent", value)
    for name, minimum in (("trainable_parameters", 0), ("total_parameters", 1)):
        value = data.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
            raise _fail(source, name, f"an integer >= {minimum} or absent", value)
    train = data.get("train")
    if train is not None and not isinstance(train, dict):
        raise _fail(source, "train", "an object or absent", train)

    return {
        **data,
        "center": center,
        "metrics": normalised_metrics,
        "method": data.get("method"),
        "base_model": data.get("base_model"),
        "dataset": data.get("dataset"),
        "trainable_parameters": data.get("trainable_parameters"),
        "total_parameters": data.get("total_parameters"),
        "train": dict(train or {}),
    }


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """Read and validate an evaluation JSON file (see the module docstring for its shape).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: naming the file, and the field when the JSON parses but a field is wrong.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    return validate_evaluation(data, source=str(path))
