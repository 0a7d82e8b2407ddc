"""Choosing centers, deterministic train/test splits by case, and few-shot subsets by number of training cases."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
from datasets import Dataset, DatasetDict

from .validation import DataValidationError


def center_names(dataset: Dataset | DatasetDict) -> list[str]:
    """The centers present in a dataset (all splits of a `DatasetDict`), sorted by name: a stable order."""
    splits = dataset.values() if isinstance(dataset, DatasetDict) else [dataset]
    return sorted({center for split in splits for center in split["center"]})


def hash_split(centers: Sequence[str], case_ids: Sequence[str], test_fraction: float = 0.2) -> list[str]:
    """ "train"/"test" for each row, the same for all rows of a case: within each center, cases are sorted by
    sha1("<center>/<case_id>") and the first round((1 - test_fraction) * n_cases) go to train.

    This is the rule the shared data was split with, so it also splits folders that come without a manifest.
    """
    cases_by_center: dict[str, set[str]] = {}
    for center, case_id in zip(centers, case_ids):
        cases_by_center.setdefault(center, set()).add(case_id)
    train_cases = set()
    for center, cases in cases_by_center.items():
        ordered = sorted(cases, key=lambda case: hashlib.sha1(f"{center}/{case}".encode()).hexdigest())
        num_train = round((1.0 - test_fraction) * len(ordered))
        train_cases.update((center, case) for case in ordered[:num_train])
    return ["train" if (center, case) in train_cases else "test" for center, case in zip(centers, case_ids)]


def _select_rows(dataset: Dataset, keep: Iterable[bool]) -> Dataset:
    return dataset.select([index for index, kept in enumerate(keep) if kept])


def select_centers(dataset: Dataset | DatasetDict, centers: str | Sequence[str]) -> Dataset | DatasetDict:
    """Keep the rows of the given centers. Raises if a requested center has no samples (in any split)."""
    wanted = [centers] if isinstance(centers, str) else list(centers)
    available = center_names(dataset)
    missing = [center for center in wanted if center not in available]
    if missing:
        raise DataValidationError(f"requested center(s) {missing} have no samples; available centers: {available}.")
    wanted_set = set(wanted)
    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {name: _select_rows(split, (c in wanted_set for c in split["center"])) for name, split in dataset.items()}
        )
    return _select_rows(dataset, (c in wanted_set for c in dataset["center"]))


def few_shot_subset(dataset: Dataset, num_cases: int, seed: int = 0, per_center: bool = True) -> Dataset:
    """All rows of `num_cases` randomly chosen cases (per center by default), deterministic given `seed`.

    Cases are drawn from a seeded permutation of the sorted case ids, so a smaller subset is always contained in a
    larger one with the same seed (1-shot within 5-shot within 10-shot). Asking for more cases than a center has
    raises, naming the center.
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}.")
    centers = dataset["center"]
    case_ids = dataset["case_id"]
    groups: dict[str, set[str]] = {}
    for center, case_id in zip(centers, case_ids):
        groups.setdefault(center if per_center else "", set()).add(case_id)
    chosen: set[tuple[str, str]] = set()
    for group, cases in sorted(groups.items()):
        if num_cases > len(cases):
            where = f"center {group!r}" if per_center else "the dataset"
            raise DataValidationError(f"{where} has {len(cases)} cases, fewer than the {num_cases} requested.")
        # One generator per group, seeded by seed and group name, so adding a center does not change the others.
        group_seed = int.from_bytes(hashlib.sha1(f"{seed}/{group}".encode()).digest()[:8], "little")
        order = np.random.default_rng(group_seed).permutation(len(cases))
        ordered_cases = sorted(cases)
        chosen.update((group, ordered_cases[i]) for i in order[:num_cases])
    keys = ((center if per_center else "", case_id) for center, case_id in zip(centers, case_ids))
    return _select_rows(dataset, (key in chosen for key in keys))
