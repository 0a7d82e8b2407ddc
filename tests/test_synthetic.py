import time
from itertools import combinations

import numpy as np
import pytest

from peft_medseg.data import center_names, synthetic
from peft_medseg.data.synthetic import (
    CENTERS,
    HELD_OUT_CENTER,
    NUM_LABELS,
    generate_synthetic_mri,
    load_synthetic_mri,
    synthetic_cache_dir,
)

SMALL = dict(image_size=32, train_subjects=2, test_subjects=1, slices_per_subject=2)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    return load_synthetic_mri(cache_dir=tmp_path_factory.mktemp("cache"), seed=0, **SMALL)


def arrays(dataset, center):
    rows = [i for i, c in enumerate(dataset["center"]) if c == center]
    subset = dataset.select(rows)
    images = np.stack([np.array(image) for image in subset["image"]])
    labels = np.stack([np.array(label) for label in subset["label"]])
    return images, labels


def test_layout_and_split_by_subject(small_dataset):
    assert center_names(small_dataset) == sorted(CENTERS) and len(CENTERS) >= 5
    assert HELD_OUT_CENTER == CENTERS[-1] == "flair_1p5t"
    train, test = small_dataset["train"], small_dataset["test"]
    assert len(train) == len(CENTERS) * 2 * 2 and len(test) == len(CENTERS) * 1 * 2
    assert set(train["case_id"]).isdisjoint(test["case_id"])
    row = train[0]
    assert row["image"].mode == "L" and row["image"].size == (32, 32)
    assert np.array(row["label"]).max() < NUM_LABELS


def test_deterministic_by_seed(tmp_path):
    first = generate_synthetic_mri(
        tmp_path / "a", seed=5, image_size=16, train_subjects=1, test_subjects=1, slices_per_subject=1
    )
    second = generate_synthetic_mri(
        tmp_path / "b", seed=5, image_size=16, train_subjects=1, test_subjects=1, slices_per_subject=1
    )
    other = generate_synthetic_mri(
        tmp_path / "c", seed=6, image_size=16, train_subjects=1, test_subjects=1, slices_per_subject=1
    )
    files = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert len(files) == len(CENTERS) * 2 * 2
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / "manifest.csv").read_text() == (second / "manifest.csv").read_text()
    assert any((first / f).read_bytes() != (other / f).read_bytes() for f in files)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    start = time.perf_counter()
    data = load_synthetic_mri(cache_dir=tmp_path_factory.mktemp("default"))
    return data, time.perf_counter() - start


def test_default_size_and_time(default_dataset):
    data, elapsed = default_dataset
    assert elapsed < 60
    for center in CENTERS:
        assert list(data["train"]["center"]).count(center) == 80
        assert list(data["test"]["center"]).count(center) == 24
    assert data["train"][0]["image"].size == (64, 64)


def test_centers_differ_in_intensity_but_share_labels(default_dataset):
    data, _ = default_dataset
    stats = {}
    fractions = {}
    for center in CENTERS:
        images, labels = arrays(data["train"], center)
        # Mean intensity of CSF, grey matter and white matter: the contrast signature of the scanner.
        stats[center] = np.array([images[labels == k].mean() for k in (1, 2, 3)])
        fractions[center] = np.bincount(labels.ravel(), minlength=NUM_LABELS) / labels.size
        assert set(np.unique(labels)) == {0, 1, 2, 3}
    # Every pair of centers differs by at least 15 gray levels in some tissue.
    for a, b in combinations(CENTERS, 2):
        assert np.abs(stats[a] - stats[b]).max() > 15, (a, b, stats[a], stats[b])
    # Contrast weighting: T1w has WM brighter than GM brighter than CSF; T2w the reverse; FLAIR has dark CSF.
    assert stats["t1w_3t"][2] > stats["t1w_3t"][1] > stats["t1w_3t"][0]
    assert stats["t2w_3t"][0] > stats["t2w_3t"][1] > stats["t2w_3t"][2]
    assert stats["flair_1p5t"][0] < stats["flair_1p5t"][1]
    # Labels come from the same anatomy: the brain covers a similar area, and CSF/GM/WM proportions within the
    # brain agree across centers (they would not if labels depended on the simulated scanner).
    all_fractions = np.stack(list(fractions.values()))
    assert np.ptp(all_fractions[:, 0]) < 0.06
    tissue = all_fractions[:, 1:] / all_fractions[:, 1:].sum(axis=1, keepdims=True)
    assert np.ptp(tissue, axis=0).max() < 0.03


def test_noise_differs_between_centers(small_dataset):
    # Rician noise: the background standard deviation of the FLAIR-like center exceeds the 3 T T1w one.
    flair, flair_labels = arrays(small_dataset["train"], "flair_1p5t")
    t1, t1_labels = arrays(small_dataset["train"], "t1w_3t")
    assert flair[flair_labels == 0].std() > 1.5 * t1[t1_labels == 0].std()


def test_cache_reused_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_MEDSEG_CACHE", str(tmp_path / "env"))
    target = synthetic_cache_dir(seed=1, **SMALL)
    assert target.parent == tmp_path / "env" / "synthetic" and target.name.startswith(
        f"v{synthetic.GENERATOR_VERSION}-"
    )
    assert synthetic_cache_dir(seed=2, **SMALL) != target

    def killed(output_dir, *args, **kwargs):
        output_dir.mkdir(parents=True)
        (output_dir / "manifest.csv").write_text("center,id,split,group\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_synthetic_mri", killed)
    with pytest.raises(KeyboardInterrupt):
        load_synthetic_mri(seed=1, **SMALL)
    # Nothing a loader would accept, and no staging folder left behind.
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setenv("PEFT_MEDSEG_CACHE", str(tmp_path / "env"))
    first = load_synthetic_mri(seed=1, centers=["t2w_3t"], **SMALL)
    assert center_names(first) == ["t2w_3t"]
    monkeypatch.setattr(synthetic, "generate_synthetic_mri", killed)
    again = load_synthetic_mri(seed=1, **SMALL)  # served from the cache: the generator is not called
    assert len(again["train"]) == len(CENTERS) * 4
