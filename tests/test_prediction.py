"""Scans in, masks out: geometry round trips, routing by center signatures, mixed batches, and errors at the edges."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import IMAGE_SIZE, NUM_LABELS, make_folder_dataset

import peft_medseg
from peft_medseg.data import load_multicenter_dataset
from peft_medseg.models import build_image_processor, build_segmentation_model
from peft_medseg.prediction import Predictor, find_scans, predict_to_folder, read_scan
from peft_medseg.routing import SIGNATURE_FILENAME, CenterRouter, CenterSignature
from peft_medseg.storage import OutputDirError, load_base, save_base, save_finetuned
from peft_medseg.training import center_signature, eval_transform

nibabel = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A saved tiny base, the folder dataset it routes between, and adapters for centers A and B with signatures."""
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("zoo")
    data_root = make_folder_dataset(root / "data", images_per_center=16)
    data, _ = load_multicenter_dataset(str(data_root))
    torch.manual_seed(0)
    save_base(
        build_segmentation_model("tiny", NUM_LABELS, image_size=IMAGE_SIZE).eval(),
        build_image_processor(IMAGE_SIZE),
        root / "base",
    )
    for center in ("A", "B"):
        base, processor = load_base(root / "base")
        signature = center_signature(base, processor, data, center)
        model = get_peft_model(base, peft_medseg.VisualPromptConfig(num_virtual_tokens=3))
        with torch.no_grad():  # trained-looking prompts: a zero effect would hide a wrong route
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(3 * torch.randn_like(param))
        save_finetuned(model, root / "adapters" / center, attachments=[signature.save])
    return root, data_root, data


def _reference_mask(base_dir: Path, adapter: Path | None, image: np.ndarray) -> np.ndarray:
    """An independent prediction: the model on the eval transform, logits resized to the image, argmax."""
    from peft import PeftModel

    base, processor = load_base(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter)).eval() if adapter else base
    example = eval_transform(processor).transform_example(image, np.zeros(image.shape[:2], np.int64))
    with torch.no_grad():
        logits = model(pixel_values=example["pixel_values"][None]).logits
    logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear")
    return logits[0].argmax(0).numpy()


def test_png_round_trip_keeps_size_and_label_ids(zoo, tmp_path):
    root, _, _ = zoo
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)  # not the model's size, not square, RGB
    Image.fromarray(image).save(tmp_path / "scan.png")
    predictor = Predictor(root / "base", [root / "adapters" / "A"])
    predict_to_folder(predictor, [tmp_path / "scan.png"], tmp_path / "out", progress=False)
    mask = Image.open(tmp_path / "out" / "masks" / "scan.png")
    assert mask.size == (50, 37) and mask.mode == "L"
    np.testing.assert_array_equal(np.array(mask), _reference_mask(root / "base", root / "adapters" / "A", image))
    assert set(np.unique(np.array(mask))) <= set(range(NUM_LABELS))
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert rows[0]["route"] == "A" and int(rows[0][f"{predictor.id2label[1]}_count"]) == int(
        (np.array(mask) == 1).sum()
    )
    assert (tmp_path / "out" / "overlays" / "scan.png").is_file()


def test_nifti_round_trip_keeps_affine_spacing_and_shape(zoo, tmp_path):
    root, _, _ = zoo
    affine = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1]])
    volume = np.random.default_rng(1).normal(100, 20, (30, 26, 4)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, affine), tmp_path / "case.nii.gz")
    predictor = Predictor(root / "base", [root / "adapters" / "B"])
    predict_to_folder(predictor, [tmp_path / "case.nii.gz"], tmp_path / "out", progress=False)
    saved = nibabel.load(tmp_path / "out" / "masks" / "case.nii.gz")
    assert saved.shape == volume.shape
    np.testing.assert_allclose(saved.affine, affine, atol=1e-5)
    assert tuple(saved.header.get_zooms()) == pytest.approx((0.8, 0.9, 2.5))
    mask = np.asarray(saved.dataobj)
    assert mask.dtype == np.uint8
    # Slice by slice, each slice as the 2D model sees it.
    np.testing.assert_array_equal(
        mask[..., 2], _reference_mask(root / "base", root / "adapters" / "B", volume[..., 2])
    )
    row = next(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert float(row[f"{predictor.id2label[1]}_mm3"]) == pytest.approx((mask == 1).sum() * 0.8 * 0.9 * 2.5, rel=1e-4)


def test_nnunet_channel_files_form_one_case(tmp_path):
    for channel in (0, 1):
        nibabel.save(
            nibabel.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), tmp_path / f"p1_000{channel}.nii.gz"
        )
    (scan,) = find_scans([tmp_path])
    assert scan.name == "p1" and [p.name for p in scan.paths] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]
    assert read_scan(scan).array.shape == (2, 4, 4, 2)
    (tmp_path / "p1_0001.nii.gz").rename(tmp_path / "p1_0002.nii.gz")
    with pytest.raises(ValueError, match="without a gap"):
        find_scans([tmp_path])


def _test_images(data_root: Path, center: str) -> list[Path]:
    return sorted((data_root / center / "images").glob("*.png"))


def test_router_picks_the_right_center_and_rejects_a_foreign_input(zoo, tmp_path):
    root, data_root, _ = zoo
    base, processor = load_base(root / "base")
    router = CenterRouter.from_adapters([root / "adapters" / "A", root / "adapters" / "B"])
    router.check_base(base)
    transform = eval_transform(processor)

    def pixel_values(paths):
        images = [np.array(Image.open(p)) for p in paths]
        return torch.stack([transform.transform_example(i, np.zeros(i.shape[:2]))["pixel_values"] for i in images])

    for center in ("A", "B"):
        routes = router.route(base, pixel_values(_test_images(data_root, center)))
        assert np.mean([n == center for n in routes.nearest]) >= 0.9, routes.nearest
    # A foreign input: a sharp checkerboard, unlike either center's smooth shapes on noise.
    board = ((np.indices((IMAGE_SIZE, IMAGE_SIZE)).sum(0) // 2) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    routes = router.route(base, pixel_values([tmp_path / "board.png"]))
    assert routes.adapter_names == [peft_medseg.BASE_ADAPTER_NAME] and routes.calibrated[0] > 1


def test_routed_mixed_batch_equals_per_sample_predictions(zoo, tmp_path):
    root, data_root, _ = zoo
    scans = [
        read_scan(s)
        for s in find_scans(
            [*_test_images(data_root, "A")[:3], *_test_images(data_root, "B")[:3]][::-1], unique_names=False
        )
    ]
    # Output names collide across centers (same file names): predict in memory.
    auto = Predictor(root / "base", [root / "adapters"], route="auto", batch_size=4)
    routed = auto.predict(scans)
    assert {"A", "B"} <= {p.route for p in routed}
    for prediction in routed:
        alone = Predictor(root / "base", [root / "adapters"], route=prediction.route).predict([prediction.scan])[0]
        np.testing.assert_array_equal(prediction.mask, alone.mask)


def test_signature_round_trip_and_refused_with_another_base(zoo, tmp_path):
    root, _, _ = zoo
    signature = CenterSignature.load(root / "adapters" / "A" / SIGNATURE_FILENAME)
    assert signature.center == "A" and signature.threshold > 0 and signature.num_calibration_images > 0
    other = build_segmentation_model("tiny", NUM_LABELS, image_size=IMAGE_SIZE).eval()  # another random init
    with pytest.raises(ValueError, match="another base model"):
        CenterRouter({"A": signature}).check_base(other)
    save_base(other, build_image_processor(IMAGE_SIZE), tmp_path / "other-base")
    with pytest.raises(ValueError, match="another base model"):
        Predictor(tmp_path / "other-base", [root / "adapters"], route="auto")


def test_missing_signature_names_the_file(zoo, tmp_path):
    root, _, _ = zoo
    shutil.copytree(root / "adapters" / "A", tmp_path / "A")
    (tmp_path / "A" / SIGNATURE_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=SIGNATURE_FILENAME):
        Predictor(root / "base", [tmp_path / "A"], route="auto")


def test_existing_output_is_refused_and_a_failed_run_leaves_it_as_it_was(zoo, tmp_path):
    root, data_root, _ = zoo
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")
    predictor = Predictor(root / "base", [root / "adapters" / "A"])
    with pytest.raises(OutputDirError, match="already exists"):
        predict_to_folder(predictor, _test_images(data_root, "A")[:1], output, progress=False)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        predict_to_folder(
            predictor,
            [*_test_images(data_root, "A")[:2], tmp_path / "broken.png"],
            output,
            overwrite=True,
            progress=False,
        )
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def _write_dicom_series(folder: Path, series_uid: str, num_slices: int = 3, start: int = 0) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for z in range(num_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.3"
        ds.Modality, ds.InstanceNumber = "CT", z + 1
        ds.Rows = ds.Columns = 20
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.0
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.random.default_rng(z).integers(0, 1000, (20, 20), dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{start + z:03d}.dcm", enforce_file_format=True)


def test_dicom_series_becomes_nifti_and_a_mixed_folder_is_refused(zoo, tmp_path):
    pytest.importorskip("pydicom")
    root, _, _ = zoo
    _write_dicom_series(tmp_path / "series", "1.2.3.4")
    predictor = Predictor(root / "base", [root / "adapters" / "A"])
    predict_to_folder(predictor, [tmp_path / "series"], tmp_path / "out", progress=False)
    saved = nibabel.load(tmp_path / "out" / "masks" / "series.nii.gz")
    assert saved.shape == (20, 20, 3)
    assert tuple(saved.header.get_zooms()) == pytest.approx((0.7, 0.7, 2.0))
    _write_dicom_series(tmp_path / "mixed", "1.2.3.4")
    _write_dicom_series(tmp_path / "mixed", "1.2.3.5", start=10)
    with pytest.raises(ValueError, match="2 DICOM series"):
        predict_to_folder(predictor, [tmp_path / "mixed"], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_predict_recipe_routes_and_writes_the_csv(zoo, tmp_path):
    import subprocess
    import sys

    from test_recipes import ENV, REPO

    root, data_root, _ = zoo
    inputs = [_test_images(data_root, "A")[0], _test_images(data_root, "C")[1]]
    result = subprocess.run(
        [sys.executable, REPO / "recipes" / "predict.py", "--base_model", root / "base", "--adapters",
         root / "adapters", "--route", "auto", "--output_dir", tmp_path / "out", *inputs],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [Path(r["input"]).name for r in rows] == ["000.png", "001.png"]
    assert rows[0]["route"] == "A" and float(rows[0]["calibrated_distance"]) <= 1
    again = subprocess.run(
        [sys.executable, REPO / "recipes" / "predict.py", "--base_model", root / "base", "--adapter",
         root / "adapters" / "A", "--output_dir", tmp_path / "out", *inputs],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert again.returncode == 2 and "already exists" in again.stderr


def test_app_answers_through_gradio_client(zoo, tmp_path):
    """The app as a user reaches it: a real local server, a PNG upload, "auto", through gradio_client."""
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file
    from test_recipes import ENV, REPO

    root, data_root, _ = zoo
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, REPO / "recipes" / "app.py", "--base_model", root / "base", "--adapters", root / "adapters",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**ENV, "GRADIO_ANALYTICS_ENABLED": "False"},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the app did not start:\n{server.stdout.read()[-3000:]}") from None
                time.sleep(1)
        image = _test_images(data_root, "B")[0]
        overlay, text, mask_path = client.predict(handle_file(str(image)), "auto", 50, api_name="/segment")
        assert text.startswith("route: B") and "accepted" in text
        mask = np.array(Image.open(mask_path))
        np.testing.assert_array_equal(
            mask, _reference_mask(root / "base", root / "adapters" / "B", np.array(Image.open(image)))
        )
        assert Path(overlay).is_file()
        _, text, _ = client.predict(handle_file(str(image)), peft_medseg.BASE_ADAPTER_NAME, 50, api_name="/segment")
        assert text.startswith(f"route: {peft_medseg.BASE_ADAPTER_NAME}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_routing_report_counts_and_auroc(zoo, tmp_path):
    from peft_medseg.experiments.routing_eval import auroc, evaluate_routing, write_routing_report

    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0 and auroc([0.3], [0.3]) == 0.5 and auroc([0.5, 0.1], [0.3]) == 0.5
    root, _, data = zoo
    base, processor = load_base(root / "base")
    signatures = {c: CenterSignature.load(root / "adapters" / c / SIGNATURE_FILENAME) for c in ("A", "B")}
    test = data["test"]
    test.set_transform(eval_transform(processor))
    summary = evaluate_routing(base, signatures, test, NUM_LABELS)
    assert summary["centers"]["C"]["has_signature"] is False
    for center, entry in summary["centers"].items():
        routes = entry["routes"]
        assert sum(routes.values()) == entry["images"]
        own = center if center in signatures else peft_medseg.BASE_ADAPTER_NAME
        assert entry["correct"] == pytest.approx(routes.get(own, 0) / entry["images"])
    assert set(summary["unknown"]) == {"A", "B", "C"}
    markdown = write_routing_report(summary, tmp_path)
    assert "| C | no (unknown) |" in markdown and (tmp_path / "routing.png").stat().st_size > 0
