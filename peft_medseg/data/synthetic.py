"""The embedded default dataset: multi-center brain MRI slices simulated from real anatomy.

**The domain shift in this dataset is simulated.** The anatomy is real: nilearn's bundled MNI152 (ICBM 2009a)
T1 template and its grey/white-matter probability maps, which ship inside the nilearn pip package, so nothing is
downloaded. Every "center" renders the same kind of anatomy with a different simulated scanner:

- contrast weighting: T1w at 3 T and 1.5 T, PDw, T2w and a FLAIR-like contrast (dark CSF);
- Rician noise level, multiplicative bias field, in-plane acquisition resolution and blur (point spread);
- intensity non-linearity (gamma) and output scaling.

Subjects differ by a random smooth elastic plus affine warp applied to image and labels together, and each gives
`slices_per_subject` axial slices from different levels (lateral ventricles up to the centrum semiovale).
Labels: 0 background, 1 CSF, 2 grey matter, 3 white matter; CSF is the brain mask minus the grey- and
white-matter probabilities, with the bundled brain mask grown by 2 mm to take in the CSF around
the cortex. Labels come from the anatomy only, so they are shared across centers.

`CENTERS` lists the centers; the last one (`flair_1p5t`, low resolution and the lowest SNR) is the most shifted
and is the held-out "new center" by default (`HELD_OUT_CENTER`, the others are `SOURCE_CENTERS`).

The dataset is deterministic given its parameters and seed, and is cached on disk as a folder dataset
(`<center>/images`, `<center>/masks`, `manifest.csv`) under `~/.cache/peft_medseg/synthetic/<version-hash>`,
or under `$PEFT_MEDSEG_CACHE/synthetic/` or `cache_dir`. The cache is written to a temporary folder and renamed
into place, so an interrupted generation never leaves a partial cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets import DatasetDict
from PIL import Image
from scipy import ndimage

from ..storage import atomic_directory
from .folder import load_folder_dataset

# Bump when the generated data changes: it is part of the cache folder name.
GENERATOR_VERSION = 1

ID2LABEL = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
NUM_LABELS = len(ID2LABEL)

# Square field of view of every slice, in mm: the pixel spacing is FIELD_OF_VIEW_MM / image_size.
FIELD_OF_VIEW_MM = 192.0

# Axial slices are drawn from these bands of MNI152 voxel z indices (1 mm; z=72 is MNI z=0), one per slice.
_SLICE_BANDS = ((78, 88), (90, 100), (102, 112), (114, 124))
# Brain centre in MNI152 voxel coordinates (x, y), around which the field of view is placed.
_BRAIN_CENTER_VOXEL = (98.0, 117.0)
# Mean T1 template intensity of CSF, grey and white matter: the texture left after removing it is real anatomy.
_TEMPLATE_TISSUE_T1 = (0.0, 0.33, 0.65, 0.86)


@dataclass(frozen=True)
class ScannerProfile:
    """How one simulated center turns tissue probabilities into an image."""

    name: str
    description: str
    # Signal of background, CSF, grey matter, white matter before noise (relative units).
    tissue_signal: tuple[float, float, float, float]
    # Gain on the real T1 template texture; negative for contrasts that invert T1 (T2w, FLAIR).
    texture_gain: float
    # Rician noise sigma, relative to the white-matter signal of a T1w image (1.0).
    noise: float
    # Peak-to-peak amplitude of the smooth multiplicative bias field (0.3 means roughly +-15%).
    bias: float
    # Acquisition matrix as a fraction of the output size (lower = coarser in-plane resolution).
    resolution: float
    # Point-spread blur, sigma in output pixels, before sampling at the acquisition matrix.
    blur: float
    # Intensity non-linearity applied to the normalised image, and the 8-bit value of intensity 1.0.
    gamma: float
    gain: float


SCANNER_PROFILES = (
    ScannerProfile(
        "t1w_3t",
        "T1-weighted, 3 T: high GM/WM contrast, strong bias field, high SNR",
        (0.0, 0.22, 0.55, 0.88),
        0.6,
        0.02,
        0.35,
        1.0,
        0.4,
        1.0,
        230.0,
    ),
    ScannerProfile(
        "t1w_1p5t",
        "T1-weighted, 1.5 T: lower GM/WM contrast, mild bias field, lower SNR",
        (0.0, 0.30, 0.55, 0.74),
        0.5,
        0.04,
        0.15,
        0.8,
        0.6,
        1.15,
        250.0,
    ),
    ScannerProfile(
        "t1w_3t_lowres",
        "T1-weighted, 3 T, another vendor: coarse matrix, blur, compressed highs",
        (0.0, 0.18, 0.50, 0.82),
        0.6,
        0.03,
        0.45,
        0.65,
        0.9,
        0.75,
        205.0,
    ),
    ScannerProfile(
        "pdw_1p5t",
        "Proton-density weighted, 1.5 T: flat contrast, bright CSF and GM",
        (0.0, 0.85, 0.78, 0.62),
        -0.2,
        0.05,
        0.15,
        0.8,
        0.6,
        1.0,
        240.0,
    ),
    ScannerProfile(
        "t2w_3t",
        "T2-weighted, 3 T: bright CSF, WM darker than GM",
        (0.0, 1.0, 0.60, 0.38),
        -0.5,
        0.03,
        0.3,
        1.0,
        0.5,
        0.9,
        235.0,
    ),
    ScannerProfile(
        "flair_1p5t",
        "FLAIR-like, 1.5 T: suppressed CSF, low SNR, coarse matrix (held-out center)",
        (0.0, 0.08, 0.70, 0.45),
        -0.4,
        0.08,
        0.25,
        0.6,
        1.1,
        1.3,
        220.0,
    ),
)

CENTERS: tuple[str, ...] = tuple(profile.name for profile in SCANNER_PROFILES)
HELD_OUT_CENTER = CENTERS[-1]
SOURCE_CENTERS: tuple[str, ...] = CENTERS[:-1]


def _load_anatomy() -> dict[str, np.ndarray]:
    # Bundled with nilearn (no download); 197 x 233 x 189 voxels of 1 mm.
    from nilearn import datasets as nilearn_datasets

    template = nilearn_datasets.load_mni152_template().get_fdata(dtype=np.float32)
    grey = nilearn_datasets.load_mni152_gm_template().get_fdata(dtype=np.float32)
    white = nilearn_datasets.load_mni152_wm_template().get_fdata(dtype=np.float32)
    brain = nilearn_datasets.load_mni152_brain_mask().get_fdata(dtype=np.float32) > 0
    # The bundled mask stops at the cortical surface; 2 mm more adds the subarachnoid CSF around the brain.
    brain = ndimage.binary_dilation(brain, iterations=2).astype(np.float32)
    return {"t1": template, "grey": grey, "white": white, "brain": brain}


def _subject_grid(rng: np.random.Generator, fine_size: int) -> tuple[np.ndarray, np.ndarray]:
    """MNI voxel (x, y) coordinates of the fine sampling grid for one subject: affine plus smooth elastic warp."""
    spacing = FIELD_OF_VIEW_MM / fine_size
    axis = (np.arange(fine_size) - (fine_size - 1) / 2) * spacing
    # Rows run anterior to posterior and columns left to right, as in a radiological axial view.
    rows, cols = np.meshgrid(axis, axis, indexing="ij")
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1) * np.exp(rng.uniform(-0.05, 0.05, size=2))
    shift = rng.uniform(-6, 6, size=2)
    # Elastic part: random displacements on a coarse 6 x 6 grid (std 3 mm), smoothly interpolated.
    coarse = rng.normal(0.0, 3.0, size=(2, 6, 6))
    displacement = np.stack([ndimage.zoom(c, fine_size / 6, order=3, mode="nearest") for c in coarse])
    u = cols + displacement[0]
    v = -rows + displacement[1]
    x = (np.cos(angle) * u - np.sin(angle) * v) * scale[0] + shift[0] + _BRAIN_CENTER_VOXEL[0]
    y = (np.sin(angle) * u + np.cos(angle) * v) * scale[1] + shift[1] + _BRAIN_CENTER_VOXEL[1]
    return x, y


def _tissue_maps(
    anatomy: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, z: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue probabilities (4, H, W) for background, CSF, GM, WM, and the T1 template, sampled at (x, y, z)."""
    coordinates = np.stack([x, y, np.full_like(x, z)])
    sampled = {
        name: ndimage.map_coordinates(volume, coordinates, order=1, mode="constant", cval=0.0)
        for name, volume in anatomy.items()
    }
    brain = np.clip(sampled["brain"], 0.0, 1.0)
    grey = np.clip(sampled["grey"], 0.0, 1.0) * brain
    white = np.clip(sampled["white"], 0.0, 1.0) * brain
    csf = np.clip(brain - grey - white, 0.0, 1.0)
    background = 1.0 - brain
    probabilities = np.stack([background, csf, grey, white])
    probabilities /= np.maximum(probabilities.sum(axis=0, keepdims=True), 1e-6)
    return probabilities, sampled["t1"]


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    height, width = array.shape[-2:]
    return array.reshape(*array.shape[:-2], height // factor, factor, width // factor, factor).mean(axis=(-3, -1))


def _resize(array: np.ndarray, size: int, resample) -> np.ndarray:
    return np.array(Image.fromarray(array.astype(np.float32), mode="F").resize((size, size), resample))


def _bias_field(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    coarse = rng.normal(0.0, 1.0, size=(3, 3))
    field = ndimage.zoom(coarse, size / 3, order=3, mode="nearest")
    field = (field - field.min()) / max(field.max() - field.min(), 1e-6) - 0.5
    return np.exp(strength * field)


def _render(
    profile: ScannerProfile,
    probabilities: np.ndarray,
    template: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One scanner's 8-bit image of a slice, from fine-grid tissue probabilities and the T1 template texture."""
    fine_size = probabilities.shape[-1]
    signal = np.tensordot(np.asarray(profile.tissue_signal), probabilities, axes=1)
    expected_t1 = np.tensordot(np.asarray((0.0, *_TEMPLATE_TISSUE_T1[1:])), probabilities, axes=1)
    signal = signal + profile.texture_gain * (template - expected_t1) * (1.0 - probabilities[0])
    signal = np.clip(signal, 0.0, None) * _bias_field(rng, fine_size, profile.bias)

    # Point spread, then sampling at the acquisition matrix, Rician noise there, and reconstruction to output size.
    signal = ndimage.gaussian_filter(signal, sigma=profile.blur * fine_size / image_size)
    acquisition_size = max(8, int(round(image_size * profile.resolution)))
    acquired = _resize(signal, acquisition_size, Image.Resampling.BOX)
    real = acquired + rng.normal(0.0, profile.noise, size=acquired.shape)
    imaginary = rng.normal(0.0, profile.noise, size=acquired.shape)
    magnitude = np.sqrt(real**2 + imaginary**2)
    image = _resize(magnitude, image_size, Image.Resampling.BILINEAR)

    image = np.clip(image / max(profile.tissue_signal), 0.0, None) ** profile.gamma
    return np.clip(np.round(image * profile.gain), 0, 255).astype(np.uint8)


def _parameters(seed: int, image_size: int, train_subjects: int, test_subjects: int, slices_per_subject: int) -> dict:
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}.")
    if not 1 <= slices_per_subject <= len(_SLICE_BANDS):
        raise ValueError(f"slices_per_subject must be in 1..{len(_SLICE_BANDS)}, got {slices_per_subject}.")
    return {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "train_subjects": train_subjects,
        "test_subjects": test_subjects,
        "slices_per_subject": slices_per_subject,
        "profiles": [asdict(profile) for profile in SCANNER_PROFILES],
    }


def generate_synthetic_mri(
    output_dir: str | Path,
    seed: int = 0,
    image_size: int = 64,
    train_subjects: int = 20,
    test_subjects: int = 6,
    slices_per_subject: int = 4,
) -> Path:
    """Write the synthetic dataset as a folder dataset in `output_dir` (which must not exist yet); returns it.

    Every center gets `train_subjects + test_subjects` subjects with `slices_per_subject` slices each, so by
    default 80 train and 24 test slices of `image_size` x `image_size` pixels per center.
    """
    output_dir = Path(output_dir)
    parameters = _parameters(seed, image_size, train_subjects, test_subjects, slices_per_subject)
    output_dir.mkdir(parents=True, exist_ok=False)
    anatomy = _load_anatomy()
    # Anatomy is sampled on a grid twice as fine as the output, then averaged down, to avoid aliasing.
    fine_size = 2 * image_size
    bands = [_SLICE_BANDS[i] for i in np.linspace(0, len(_SLICE_BANDS) - 1, slices_per_subject).round().astype(int)]
    manifest = ["center,id,split,group"]
    for center_index, profile in enumerate(SCANNER_PROFILES):
        (output_dir / profile.name / "images").mkdir(parents=True)
        (output_dir / profile.name / "masks").mkdir(parents=True)
        for subject in range(train_subjects + test_subjects):
            rng = np.random.default_rng([seed, center_index, subject])
            x, y = _subject_grid(rng, fine_size)
            case_id = f"{profile.name}-sub{subject:03d}"
            split = "train" if subject < train_subjects else "test"
            for band_index, (low, high) in enumerate(bands):
                probabilities, template = _tissue_maps(anatomy, x, y, rng.uniform(low, high))
                labels = _block_mean(probabilities, 2).argmax(axis=0).astype(np.uint8)
                image = _render(profile, probabilities, template, image_size, rng)
                sample_id = f"sub{subject:03d}_slice{band_index}"
                Image.fromarray(image, mode="L").save(output_dir / profile.name / "images" / f"{sample_id}.png")
                Image.fromarray(labels, mode="L").save(output_dir / profile.name / "masks" / f"{sample_id}.png")
                manifest.append(f"{profile.name},{sample_id},{split},{case_id}")
    (output_dir / "manifest.csv").write_text("\n".join(manifest) + "\n")
    info = dict(parameters, centers=list(CENTERS), id2label=ID2LABEL, pixel_spacing_mm=FIELD_OF_VIEW_MM / image_size)
    (output_dir / "info.json").write_text(json.dumps(info, indent=2))
    return output_dir


def synthetic_cache_dir(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    image_size: int = 64,
    train_subjects: int = 20,
    test_subjects: int = 6,
    slices_per_subject: int = 4,
) -> Path:
    """Where the dataset with these parameters is cached: `<base>/v<version>-<hash of parameters>`.

    `<base>` is `cache_dir`, else `$PEFT_MEDSEG_CACHE/synthetic`, else `~/.cache/peft_medseg/synthetic`.
    """
    if cache_dir is None:
        root = os.environ.get("PEFT_MEDSEG_CACHE")
        cache_dir = Path(root) / "synthetic" if root else Path.home() / ".cache" / "peft_medseg" / "synthetic"
    parameters = _parameters(seed, image_size, train_subjects, test_subjects, slices_per_subject)
    digest = hashlib.sha1(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"v{GENERATOR_VERSION}-{digest}"


def load_synthetic_mri(
    cache_dir: str | Path | None = None,
    seed: int = 0,
    image_size: int = 64,
    train_subjects: int = 20,
    test_subjects: int = 6,
    slices_per_subject: int = 4,
    centers: list[str] | tuple[str, ...] | None = None,
) -> DatasetDict:
    """The simulated multi-center brain MRI dataset as a train/test `DatasetDict`, generated on first use.

    Columns: `image` (8-bit grayscale PIL image), `label` (0 background, 1 CSF, 2 grey matter, 3 white matter),
    `center` (one of `CENTERS`), `case_id` (the subject: train and test never share one) and `id`.
    `centers` keeps only those centers. See the module docstring: the domain shift is simulated.
    """
    target = synthetic_cache_dir(cache_dir, seed, image_size, train_subjects, test_subjects, slices_per_subject)
    if not (target / "info.json").is_file():
        # Generated next to the cache folder and swapped in whole: a reader never sees a half-written dataset, and two
        # processes that generate at once each swap in an identical copy.
        with atomic_directory(target) as staging:
            staging.rmdir()  # generate_synthetic_mri creates its own folder
            generate_synthetic_mri(staging, seed, image_size, train_subjects, test_subjects, slices_per_subject)
    return load_folder_dataset(target, centers=centers, num_labels=NUM_LABELS, validate=False)
