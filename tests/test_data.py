import csv
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from peft_medseg.data import (
    DataValidationError,
    SegmentationTransform,
    apply_transforms,
    center_names,
    collate_segmentation,
    few_shot_subset,
    load_folder_dataset,
    load_hf_segmentation_dataset,
    load_nifti_dataset,
    select_centers,
)
from peft_medseg.metrics import stack_slices
from peft_medseg.models import build_image_processor

SHARED_DATA = Path(
    os.environ.get("PEFT_MEDSEG_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def write_pair(root, center, sample_id, size=(12, 10), num_labels=3, ext=".png", seed=0, mask=None):
    rng = np.random.default_rng(seed)
    (root / center / "images").mkdir(parents=True, exist_ok=True)
    (root / center / "masks").mkdir(parents=True, exist_ok=True)
    width, height = size
    PILImage.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).save(
        root / center / "images" / f"{sample_id}{ext}"
    )
    if mask is None:
        mask = rng.integers(0, num_labels, (height, width)).astype(np.uint8)
    PILImage.fromarray(mask).save(root / center / "masks" / f"{sample_id}.png")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for c, center in enumerate(["site_b", "site_a"]):
        for i in range(5):
            write_pair(root, center, f"img{i}", seed=10 * c + i, ext=".png" if i % 2 else ".jpg")
    return root


def test_folder_without_manifest(folder):
    data = load_folder_dataset(folder, num_labels=3)
    assert set(data) == {"train", "test"}
    assert data["train"].column_names == ["image", "label", "center", "case_id", "id"]
    assert center_names(data) == ["site_a", "site_b"]
    # 5 cases per center, 80/20 by case.
    assert data["train"]["center"].count("site_a") == 4 and data["test"]["center"].count("site_a") == 1
    row = data["train"][0]
    assert isinstance(row["image"], PILImage.Image) and row["image"].size == (12, 10)
    assert np.array(row["label"]).max() < 3
    # Deterministic: the same split on a second load.
    assert load_folder_dataset(folder, num_labels=3)["test"]["id"] == data["test"]["id"]


def test_folder_with_manifest_uses_split_and_group(folder):
    rows = [("site_a", f"img{i}", "test" if i == 0 else "train", f"patient{i // 2}") for i in range(5)]
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["center", "id", "split", "group"])
        writer.writerows(rows)
    data = load_folder_dataset(folder, num_labels=3)
    # Only the manifest's samples (site_b is not listed), with its splits and groups as case ids.
    assert center_names(data) == ["site_a"]
    assert data["test"]["id"] == ["img0"]
    assert data["train"]["case_id"] == ["patient0", "patient1", "patient1", "patient2"]


def test_folder_tif_images(tmp_path):
    write_pair(tmp_path, "c", "x", ext=".tif")
    write_pair(tmp_path, "c", "y", ext=".tiff")
    data = load_folder_dataset(tmp_path, num_labels=3, test_fraction=0.5)
    assert sorted([*data["train"]["id"], *data["test"]["id"]]) == ["x", "y"]


def test_error_size_mismatch(tmp_path):
    write_pair(tmp_path, "c", "x", size=(12, 10))
    PILImage.fromarray(np.zeros((11, 12), dtype=np.uint8)).save(tmp_path / "c" / "masks" / "x.png")
    with pytest.raises(DataValidationError, match=r"masks/x\.png: mask size 12x11 differs from image size 12x10"):
        load_folder_dataset(tmp_path, num_labels=3)


def test_error_missing_mask(tmp_path):
    write_pair(tmp_path, "c", "x")
    (tmp_path / "c" / "masks" / "x.png").unlink()
    with pytest.raises(DataValidationError, match=r"masks/x\.png: missing mask"):
        load_folder_dataset(tmp_path, num_labels=3)
    with pytest.raises(DataValidationError, match="missing mask"):
        load_folder_dataset(tmp_path, num_labels=3, validate=False)


def test_error_label_out_of_range_and_ignore_index(tmp_path):
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[0, 0] = 7
    write_pair(tmp_path, "c", "x", mask=mask)
    with pytest.raises(DataValidationError, match=r"masks/x\.png: label 7 outside 0\.\.2 \(num_labels=3\)"):
        load_folder_dataset(tmp_path, num_labels=3)
    mask[0, 0] = 255
    write_pair(tmp_path, "c", "x", mask=mask)
    with pytest.raises(DataValidationError, match="label 255 outside.*ignore_index=255"):
        load_folder_dataset(tmp_path, num_labels=3)
    data = load_folder_dataset(tmp_path, num_labels=3, ignore_index=255, test_fraction=0.0)
    assert data["train"]["id"] == ["x"]


def test_error_unreadable_file(tmp_path):
    write_pair(tmp_path, "c", "x")
    (tmp_path / "c" / "images" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataValidationError, match=r"images/x\.png: unreadable image file"):
        load_folder_dataset(tmp_path, num_labels=3)
    write_pair(tmp_path, "c", "x")
    (tmp_path / "c" / "masks" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataValidationError, match=r"masks/x\.png: unreadable mask file"):
        load_folder_dataset(tmp_path, num_labels=3)


def test_error_requested_center_without_samples(folder):
    with pytest.raises(
        DataValidationError, match=r"\['site_z'\] have no samples; available centers: \['site_a', 'site_b'\]"
    ):
        load_folder_dataset(folder, centers=["site_a", "site_z"], num_labels=3)
    data = load_folder_dataset(folder, centers=["site_b"], num_labels=3)
    assert center_names(data) == ["site_b"]
    with pytest.raises(DataValidationError, match="available centers: \\['site_a', 'site_b'\\]"):
        select_centers(load_folder_dataset(folder, num_labels=3), ["nowhere"])


def test_select_centers_and_few_shot():
    centers = ["a"] * 12 + ["b"] * 8
    cases = [f"a{i // 2}" for i in range(12)] + [f"b{i // 2}" for i in range(8)]  # 2 rows per case
    train = Dataset.from_dict({"center": centers, "case_id": cases, "x": list(range(20))})
    assert select_centers(train, "b")["center"] == ["b"] * 8

    two = few_shot_subset(train, 2, seed=0)
    # 2 cases per center, and every row of a chosen case.
    for center in ("a", "b"):
        chosen = [c for c, k in zip(two["case_id"], two["center"]) if k == center]
        assert len(set(chosen)) == 2 and len(chosen) == 4
    assert few_shot_subset(train, 2, seed=0)["x"] == two["x"]
    three = few_shot_subset(train, 3, seed=0)
    assert set(two["case_id"]) <= set(three["case_id"])
    assert any(few_shot_subset(train, 2, seed=s)["x"] != two["x"] for s in range(1, 6))
    assert len(set(few_shot_subset(train, 2, seed=0, per_center=False)["case_id"])) == 2
    with pytest.raises(DataValidationError, match="center 'b' has 4 cases, fewer than the 5 requested"):
        few_shot_subset(train, 5)


def test_hf_dataset_loader(tmp_path):
    rng = np.random.default_rng(0)
    images = [PILImage.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(10)]
    masks = [PILImage.fromarray(rng.integers(0, 2, (8, 8), dtype=np.uint8)) for _ in range(10)]
    features = Features({"img": Image(), "seg": Image(), "site": Value("int32"), "patient": Value("string")})
    source = Dataset.from_dict(
        {
            "img": images,
            "seg": masks,
            "site": [(i // 2) % 2 for i in range(10)],
            "patient": [f"p{i // 2}" for i in range(10)],
        },
        features=features,
    )
    source.save_to_disk(tmp_path / "ds")
    data = load_hf_segmentation_dataset(
        tmp_path / "ds",
        center_column="site",
        image_column="img",
        label_column="seg",
        case_column="patient",
        num_labels=2,
    )
    assert set(data) == {"train", "test"} and len(data["train"]) + len(data["test"]) == 10
    assert {"image", "label", "center", "case_id"} <= set(data["train"].column_names)
    assert center_names(data) == ["0", "1"]
    assert not set(data["train"]["case_id"]) & set(data["test"]["case_id"])

    with pytest.raises(DataValidationError, match=r"missing column\(s\) \['center'\]; available columns"):
        load_hf_segmentation_dataset(tmp_path / "ds", image_column="img", label_column="seg")
    with pytest.raises(DataValidationError, match=r"\[(train|test)\]\[\d+\]: label 1 outside 0\.\.0"):
        load_hf_segmentation_dataset(
            tmp_path / "ds", center_column="site", image_column="img", label_column="seg", num_labels=1
        )
    with pytest.raises(DataValidationError, match="have no samples"):
        load_hf_segmentation_dataset(
            tmp_path / "ds", center_column="site", image_column="img", label_column="seg", centers=["7"]
        )


@pytest.fixture
def nifti_root(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    volumes = {}
    for case in ("case1", "case2"):
        image = rng.normal(100, 20, size=(6, 5, 4)).astype(np.float32)
        labels = rng.integers(0, 3, size=(6, 5, 4)).astype(np.uint8)
        affine = np.diag([0.8, 0.9, 2.5, 1.0])
        for kind, array in (("images", image), ("labels", labels)):
            (tmp_path / "mri" / kind).mkdir(parents=True, exist_ok=True)
            nibabel.save(nibabel.Nifti1Image(array, affine), tmp_path / "mri" / kind / f"{case}.nii.gz")
        volumes[case] = (image, labels)
    return tmp_path, volumes


def test_nifti_loader_round_trip(nifti_root):
    root, volumes = nifti_root
    data = load_nifti_dataset(root, axis=2, num_labels=3, test_fraction=0.5)
    rows = [row for split in data.values() for row in split]
    assert len(rows) == 8  # 2 cases x 4 slices along axis 2
    assert set(data["train"]["case_id"]).isdisjoint(data["test"]["case_id"])
    np.testing.assert_allclose(rows[0]["spacing"], [0.8, 0.9, 2.5])
    for case, (image, labels) in volumes.items():
        case_rows = [row for row in rows if row["case_id"] == case]
        rebuilt = stack_slices([np.array(r["label"]) for r in case_rows], [r["slice_index"] for r in case_rows], 2)
        np.testing.assert_array_equal(rebuilt, labels)
        first = next(r for r in case_rows if r["slice_index"] == 1)
        np.testing.assert_allclose(np.array(first["image"]), image[:, :, 1])
    assert len([row for split in load_nifti_dataset(root, axis=0).values() for row in split]) == 12


def test_nifti_errors(nifti_root):
    root, _ = nifti_root
    import nibabel

    with pytest.raises(DataValidationError, match=r"labels/case1\.nii\.gz: label 2 outside 0\.\.1"):
        load_nifti_dataset(root, num_labels=2)
    nibabel.save(
        nibabel.Nifti1Image(np.zeros((6, 5, 3), np.uint8), np.eye(4)), root / "mri" / "labels" / "case2.nii.gz"
    )
    with pytest.raises(DataValidationError, match=r"case2\.nii\.gz: label volume shape \(6, 5, 3\) differs"):
        load_nifti_dataset(root)
    (root / "mri" / "labels" / "case2.nii.gz").unlink()
    with pytest.raises(DataValidationError, match=r"labels/case2\.nii\.gz: missing label volume"):
        load_nifti_dataset(root)
    with pytest.raises(DataValidationError, match=r"\['ct'\] have no samples; available centers: \['mri'\]"):
        load_nifti_dataset(root, centers=["ct"])


def test_transform_matches_processor_and_collates(folder):
    processor = build_image_processor(16, mean=0.5, std=0.25)
    data = load_folder_dataset(folder, num_labels=3)
    apply_transforms(data, processor, seed=0)
    example = data["test"][0]
    assert example["pixel_values"].shape == (3, 16, 16) and example["pixel_values"].dtype == torch.float32
    assert example["labels"].shape == (16, 16) and example["labels"].dtype == torch.long
    assert {"center", "case_id", "id"} <= set(example)
    # Eval transform equals the image processor's own output (resize, rescale, normalise) for 8-bit images.
    reference = processor(
        images=np.array(PILImage.open(folder / "site_a" / "images" / "img1.png").convert("RGB")), return_tensors="pt"
    )["pixel_values"][0]
    transform = SegmentationTransform(processor)
    ours = transform.transform_example(PILImage.open(folder / "site_a" / "images" / "img1.png"), np.zeros((10, 12)))
    np.testing.assert_allclose(ours["pixel_values"].numpy(), reference.numpy(), atol=1e-3)

    loader = torch.utils.data.DataLoader(data["train"], batch_size=4, collate_fn=collate_segmentation)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["labels"].shape == (4, 16, 16)
    assert len(batch["center"]) == 4 and len(batch["case_id"]) == 4


def test_transform_inputs_sizes_and_nearest_labels():
    transform = SegmentationTransform(
        SimpleNamespace(
            size={"shortest_edge": 8},
            image_mean=[0.0] * 3,
            image_std=[1.0] * 3,
            rescale_factor=1 / 255,
            do_rescale=True,
            do_normalize=True,
            resample=PILImage.Resampling.BILINEAR,
        )
    )
    labels = np.zeros((20, 30), dtype=np.uint8)
    labels[:, 15:] = 2
    for image in (
        np.full((20, 30), 255, np.uint8),
        np.full((20, 30, 3), 255, np.uint8),
        PILImage.new("L", (30, 20), 255),
    ):
        out = transform.transform_example(image, labels)
        assert out["pixel_values"].shape == (3, 8, 8)
        np.testing.assert_allclose(out["pixel_values"].numpy(), 1.0, atol=1e-5)
        assert set(out["labels"].unique().tolist()) == {0, 2}  # nearest: no interpolated label 1
    # Float images (NIfTI slices) are scaled by their own percentiles into [0, 1].
    ramp = PILImage.fromarray(np.linspace(-1000, 3000, 600, dtype=np.float32).reshape(20, 30), mode="F")
    values = transform.transform_example(ramp, labels)["pixel_values"]
    assert 0.0 <= values.min() < 0.1 and 0.9 < values.max() <= 1.0
    with pytest.raises(ValueError, match="label size"):
        transform.transform_example(np.zeros((5, 5), np.uint8), np.zeros((4, 5)))


def test_augmentation_is_seeded_and_keeps_alignment():
    processor = build_image_processor(32, mean=0.0, std=1.0)
    labels = np.zeros((32, 32), dtype=np.uint8)
    labels[8:24, 4:16] = 1
    image = (labels * 200 + 20).astype(np.uint8)
    outputs = [SegmentationTransform(processor, train=True, seed=3).transform_example(image, labels) for _ in range(2)]
    torch.testing.assert_close(outputs[0]["pixel_values"], outputs[1]["pixel_values"])
    eval_out = SegmentationTransform(processor).transform_example(image, labels)
    train = SegmentationTransform(processor, train=True, seed=3)
    augmented = [train.transform_example(image, labels) for _ in range(6)]
    assert any(not torch.equal(a["labels"], eval_out["labels"]) for a in augmented)
    for out in augmented:
        # The bright region moves with its label: foreground pixels are brighter than background ones.
        gray = out["pixel_values"][0]
        assert gray[out["labels"] == 1].median() > gray[out["labels"] == 0].median() + 0.3


requires_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def manifest_counts(name):
    with open(SHARED_DATA / name / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    counts = {}
    for row in rows:
        counts[(row["split"], row["center"])] = counts.get((row["split"], row["center"]), 0) + 1
    return rows, counts


@requires_shared
@pytest.mark.parametrize("name", ["fundus", "fundus_roi"])
def test_shared_fundus(name):
    if not (SHARED_DATA / name).is_dir():
        pytest.skip(f"{SHARED_DATA / name} absent")
    rows, counts = manifest_counts(name)
    data = load_folder_dataset(SHARED_DATA / name, num_labels=3)
    assert {(s, c): n for s in data for c, n in [("DrishtiGS", len(data[s]))]} == counts
    by_id = {row["id"]: row for row in rows}
    for row in data["test"].select(range(3)):
        assert row["image"].size == (int(by_id[row["id"]]["width"]), int(by_id[row["id"]]["height"]))
    assert set(np.unique(np.array(data["test"][0]["label"]))) <= {0, 1, 2}
    apply_transforms(data, build_image_processor(32))
    batch = collate_segmentation([data["train"][i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(DataValidationError, match="label 2 outside 0..1"):
        load_folder_dataset(SHARED_DATA / name, num_labels=2)


@requires_shared
def test_shared_breast_us():
    if not (SHARED_DATA / "breast_us").is_dir():
        pytest.skip("breast_us absent")
    rows, counts = manifest_counts("breast_us")
    data = load_folder_dataset(SHARED_DATA / "breast_us", num_labels=2)
    loaded = {}
    for split, dataset in data.items():
        for center in dataset["center"]:
            loaded[(split, center)] = loaded.get((split, center), 0) + 1
    assert loaded == counts
    groups = {(row["center"], row["id"]): row["group"] for row in rows}
    small = select_centers(data, ["busbra_usystems"])
    assert all(
        groups[(c, i)] == k
        for c, i, k in zip(small["train"]["center"], small["train"]["id"], small["train"]["case_id"])
    )
    assert center_names(data) == sorted({row["center"] for row in rows})


def test_transform_is_a_monai_compose_users_can_extend_and_rows_are_seeded_independently():
    from monai.transforms import Compose, Lambdad, MapTransform

    processor = build_image_processor(16, mean=0.0, std=1.0)
    extra = Lambdad("image", lambda image: image * 0.0)  # a user's own dictionary transform, before normalisation
    transform = SegmentationTransform(processor, extra_transforms=[extra])
    assert isinstance(transform.pipeline, Compose)
    assert all(isinstance(t, MapTransform) for t in transform.pipeline.transforms)
    out = transform.transform_example(np.full((16, 16), 200, np.uint8), np.zeros((16, 16), np.uint8))
    assert out["pixel_values"].abs().max() == 0

    # A row's augmentation depends on (seed, epoch, row), not on which rows share its batch.
    rows = {"image": [np.random.default_rng(i).integers(0, 255, (16, 16), np.uint8) for i in range(4)]}
    rows |= {"label": [np.eye(16, dtype=np.uint8)] * 4, "center": ["a"] * 4, "id": ["0", "1", "2", "3"]}
    train = SegmentationTransform(processor, train=True, seed=5)
    whole = train(rows)
    halves = [train({k: v[i : i + 2] for k, v in rows.items()}) for i in (0, 2)]
    for i in range(4):
        torch.testing.assert_close(whole["pixel_values"][i], halves[i // 2]["pixel_values"][i % 2], rtol=0, atol=0)
    train.set_epoch(1)
    assert not torch.equal(train(rows)["pixel_values"][0], whole["pixel_values"][0])
