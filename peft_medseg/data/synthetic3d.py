"""The embedded 3D default: two-channel head volumes with small lesions, from real anatomy, at six simulated centers.

**The domain shift and the lesions are simulated; the anatomy is real.** Every case is a whole head volume resampled
from nilearn's bundled MNI152 (ICBM 2009a) T1 template and its grey/white-matter maps (they ship inside the nilearn
pip package: nothing is downloaded), warped per subject by a random affine plus a smooth elastic displacement.

Two channels per case, two views of the same subject, the way PET and CT are in the paper's HECKTOR data:
- channel 0, *anatomy*: a structural contrast (T1w, T2w or FLAIR-like, by center) of CSF, grey and white matter
  with the real template's texture;
- channel 1, *uptake*: a low-resolution tracer-like map, grey matter above white matter, lesions hot.

Labels (the task is lesion segmentation, like the paper's tumour and lymph nodes): 0 background, 1 primary lesion
(one irregular blob of 6-12 mm radius in the cerebral white matter, in 90% of cases), 2 satellite lesions (0-4 blobs
of 2.5-5 mm radius 12-30 mm from it). Each lesion has its own texture and intensity per contrast (hypo- or
hyperintense on the anatomy channel by center, hot on the uptake channel), so Dice behaves like tumour Dice: small
objects, many empty slices, some cases without satellites.

Centers differ as scanners and protocols do: structural contrast, noise, bias field, point spread of each channel
(tracer resolution), uptake scale and lesion-to-background ratio, voxel intensity scale. `HELD_OUT_CENTERS_3D` are the
last two (the most shifted); the paper's leave-one-center-out protocol holds out each in turn.

Volumes are 96³ voxels of 2 mm (a 192 mm field of view) and written as NIfTI (`<root>/<center>/images/<case>.nii.gz`,
channels last, with the 2 mm affine; `labels/<case>.nii.gz`), cached under `~/.cache/peft_medseg/synthetic3d/`
(or `$PEFT_MEDSEG_CACHE/synthetic3d/`, or `cache_dir`), generated into a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..storage import atomic_directory
from .synthetic import _load_anatomy

GENERATOR_VERSION = 1
ID2LABEL_3D = {0: "background", 1: "primary_lesion", 2: "satellite_lesions"}
NUM_LABELS_3D = len(ID2LABEL_3D)
VOLUME_SIZE = 96
VOXEL_MM = 2.0
# Brain centre in MNI152 voxel coordinates (1 mm voxels), around which the field of view is placed.
_HEAD_CENTER_VOXEL = (98.0, 117.0, 85.0)


@dataclass(frozen=True)
class CenterProfile3D:
    """How one simulated center images a subject in its two channels."""

    name: str
    description: str
    # Anatomy channel: signal of CSF, grey matter, white matter; gain on the real T1 texture; lesion signal factor.
    tissue_signal: tuple[float, float, float]
    texture_gain: float
    lesion_contrast: float
    # Noise sigma (relative to signal 1) and peak-to-peak bias field of each channel.
    noise: tuple[float, float]
    bias: float
    # Point-spread blur (sigma, voxels) of the anatomy and uptake channels.
    blur: tuple[float, float]
    # Uptake channel: background brain uptake scale and lesion-to-background ratio.
    uptake_scale: float
    lesion_uptake: float
    # Stored intensity scale of the anatomy channel (scanner units).
    intensity_scale: float


CENTER_PROFILES_3D = (
    CenterProfile3D(
        "t1_pet_a",
        "T1w + sharp uptake, high SNR",
        (0.25, 0.55, 0.85),
        0.6,
        0.65,
        (0.02, 0.05),
        0.3,
        (0.5, 1.2),
        1.0,
        4.0,
        1000.0,
    ),
    CenterProfile3D(
        "t1_pet_b",
        "T1w 1.5 T + blurred uptake",
        (0.30, 0.55, 0.75),
        0.5,
        0.75,
        (0.04, 0.08),
        0.15,
        (0.7, 1.8),
        1.3,
        3.2,
        600.0,
    ),
    CenterProfile3D(
        "t2_pet_c",
        "T2w (lesions bright) + sharp uptake",
        (1.0, 0.6, 0.4),
        -0.5,
        1.5,
        (0.03, 0.05),
        0.3,
        (0.5, 1.3),
        0.8,
        4.5,
        1500.0,
    ),
    CenterProfile3D(
        "pd_pet_d",
        "PDw, flat contrast + noisy uptake",
        (0.85, 0.78, 0.62),
        -0.2,
        1.2,
        (0.05, 0.12),
        0.2,
        (0.6, 1.5),
        1.1,
        3.5,
        800.0,
    ),
    CenterProfile3D(
        "flair_pet_e",
        "FLAIR-like (dark CSF, bright lesions), low SNR + very blurred uptake",
        (0.08, 0.7, 0.45),
        -0.4,
        1.7,
        (0.07, 0.10),
        0.25,
        (1.0, 2.3),
        0.7,
        2.6,
        300.0,
    ),
    CenterProfile3D(
        "t1_pet_f",
        "T1w, strong bias field, coarse + low-contrast uptake",
        (0.2, 0.5, 0.9),
        0.6,
        0.55,
        (0.04, 0.15),
        0.6,
        (1.0, 2.0),
        1.6,
        2.2,
        2000.0,
    ),
)
CENTERS_3D = tuple(profile.name for profile in CENTER_PROFILES_3D)
HELD_OUT_CENTERS_3D = CENTERS_3D[-2:]
SOURCE_CENTERS_3D = CENTERS_3D[:-2]


def _downsampled_anatomy() -> dict[str, np.ndarray]:
    """The MNI152 maps at 2 mm (block means of the 1 mm volumes), and the brain mask."""
    anatomy = _load_anatomy()

    def half(volume):
        x, y, z = (s // 2 * 2 for s in volume.shape)
        return volume[:x, :y, :z].reshape(x // 2, 2, y // 2, 2, z // 2, 2).mean(axis=(1, 3, 5))

    return {name: half(volume) for name, volume in anatomy.items()}


def _smooth_field(rng: np.random.Generator, coarse_size: int, channels: int = 1) -> np.ndarray:
    """Smooth random fields (channels, N, N, N): unit normal noise on a coarse grid, interpolated trilinearly."""
    coarse = torch.from_numpy(rng.normal(0.0, 1.0, size=(1, channels, coarse_size, coarse_size, coarse_size)))
    fine = torch.nn.functional.interpolate(coarse, size=(VOLUME_SIZE,) * 3, mode="trilinear", align_corners=True)
    return fine[0].numpy()


def _subject_coordinates(rng: np.random.Generator) -> np.ndarray:
    """Coordinates (3, N, N, N) in the 2 mm anatomy grid of the subject's voxels: affine plus smooth elastic warp."""
    axis = (np.arange(VOLUME_SIZE) - (VOLUME_SIZE - 1) / 2) * VOXEL_MM  # mm from the centre
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))
    angles = np.deg2rad(rng.uniform(-8, 8, size=3))
    rotation = np.eye(3)
    for axis_index, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        r = np.eye(3)
        i, j = [k for k in range(3) if k != axis_index]
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rotation = rotation @ r
    scale = rng.uniform(0.92, 1.08) * np.exp(rng.uniform(-0.04, 0.04, size=3))
    shift = rng.uniform(-5, 5, size=3)
    displacement = 3.0 * _smooth_field(rng, 4, channels=3)  # mm, std 3 at the coarse nodes
    points = np.einsum("ij,j...->i...", rotation * scale, grid + displacement) + shift[:, None, None, None]
    center = np.asarray(_HEAD_CENTER_VOXEL)[:, None, None, None]
    return (points + center) / 2.0  # mm → 2 mm anatomy voxels


def _sample(anatomy: dict[str, np.ndarray], coordinates: np.ndarray) -> dict[str, np.ndarray]:
    """Every anatomy map sampled trilinearly at `coordinates` (3, N, N, N) voxel positions (zero outside)."""
    names = list(anatomy)
    volumes = torch.from_numpy(np.stack([anatomy[name] for name in names]))[None].float()
    shape = torch.tensor(volumes.shape[2:], dtype=torch.float64)[:, None, None, None]
    normalised = 2 * torch.from_numpy(coordinates) / (shape - 1) - 1  # grid_sample's [-1, 1], align_corners=True
    grid = normalised.flip(0).permute(1, 2, 3, 0)[None].float()  # last axis (z, y, x) indexes (W, H, D)
    sampled = torch.nn.functional.grid_sample(volumes, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return {name: sampled[0, i].numpy() for i, name in enumerate(names)}


def _blob(rng: np.random.Generator, grid_mm: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """A boolean irregular ellipsoid: radius (mm) modulated by smooth noise over the direction."""
    offset = grid_mm - centre[:, None, None, None]
    axes = radius * rng.uniform(0.75, 1.25, size=3)
    distance = np.sqrt(((offset / axes[:, None, None, None]) ** 2).sum(axis=0))
    roughness = _smooth_field(rng, 4)[0]
    return distance < 1.0 + 0.15 * roughness


def _lesions(rng: np.random.Generator, white: np.ndarray) -> np.ndarray:
    """Label volume: 1 primary lesion (90% of cases) in white matter, 2 satellite lesions (0-4) near it."""
    labels = np.zeros(white.shape, dtype=np.uint8)
    if rng.uniform() > 0.9:
        return labels
    axis = np.arange(VOLUME_SIZE) * VOXEL_MM
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))
    candidates = np.argwhere(ndimage.binary_erosion(white > 0.6, iterations=3))
    centre = candidates[rng.integers(len(candidates))] * VOXEL_MM
    labels[_blob(rng, grid, centre, rng.uniform(6, 12))] = 1
    for _ in range(rng.choice([0, 1, 2, 3, 4], p=[0.25, 0.25, 0.2, 0.15, 0.15])):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        where = centre + direction * rng.uniform(12, 30)
        satellite = _blob(rng, grid, where, rng.uniform(2.5, 5)) & (labels == 0)
        labels[satellite] = 2
    return labels


def _render_case(
    profile: CenterProfile3D, anatomy: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(image (N, N, N, 2) int16, labels (N, N, N) uint8) of one subject at one center."""
    coordinates = _subject_coordinates(rng)
    sampled = _sample(anatomy, coordinates)
    brain = np.clip(sampled["brain"], 0, 1)
    grey = np.clip(sampled["grey"], 0, 1) * brain
    white = np.clip(sampled["white"], 0, 1) * brain
    csf = np.clip(brain - grey - white, 0, 1)
    labels = _lesions(rng, white)
    primary, satellites = labels == 1, labels == 2
    lesion_texture = 1.0 + 0.25 * ndimage.gaussian_filter(rng.normal(0, 1, labels.shape), 1.0) * 3
    lesion = ndimage.gaussian_filter((primary | satellites).astype(np.float32), 0.6)

    # Anatomy channel: tissue signals plus the template's real texture; lesions scale the local signal.
    signal = profile.tissue_signal[0] * csf + profile.tissue_signal[1] * grey + profile.tissue_signal[2] * white
    template_expected = 0.33 * grey + 0.65 * white
    signal = (
        signal + profile.texture_gain * (sampled["t1"] / max(sampled["t1"].max(), 1e-6) - template_expected) * brain
    )
    signal = np.clip(signal, 0, None)
    signal = signal * (1 + lesion * (profile.lesion_contrast * lesion_texture - 1))
    # Uptake channel: grey above white matter, hot lesions (primary hotter than satellites), low resolution.
    uptake = profile.uptake_scale * (0.3 * white + 0.6 * grey + 0.1 * csf)
    hot = profile.lesion_uptake * profile.uptake_scale * 0.6 * lesion_texture
    uptake = uptake + ndimage.gaussian_filter(primary * hot + satellites * 0.7 * hot, 0.6)

    bias = _smooth_field(rng, 3)[0]
    bias = np.exp(profile.bias * (bias - bias.mean()) / max(bias.std() * 4, 1e-6))
    channels = []
    for index, volume in enumerate((signal * bias, uptake)):
        volume = ndimage.gaussian_filter(volume, profile.blur[index])
        noisy = np.sqrt(
            (volume + rng.normal(0, profile.noise[index], volume.shape)) ** 2
            + rng.normal(0, profile.noise[index], volume.shape) ** 2
        )  # Rician magnitude
        channels.append(noisy)
    # Stored as scanners store them: 16-bit integers (anatomy in scanner units, uptake in hundredths).
    image = np.stack([channels[0] * profile.intensity_scale, channels[1] * 100.0], axis=-1)
    return np.clip(np.round(image), 0, np.iinfo(np.int16).max).astype(np.int16), labels


def _parameters(seed: int, cases_per_center: int) -> dict:
    return {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "cases_per_center": cases_per_center,
        "volume_size": VOLUME_SIZE,
        "voxel_mm": VOXEL_MM,
        "profiles": [asdict(profile) for profile in CENTER_PROFILES_3D],
    }


def affine_3d() -> np.ndarray:
    """The voxel-to-world affine of every synthetic volume: 2 mm voxels, RAS, centred on the origin."""
    affine = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = -(VOLUME_SIZE - 1) / 2 * VOXEL_MM
    return affine


def _write_center(output_dir: Path, seed: int, center_index: int, cases_per_center: int) -> None:
    import nibabel

    profile = CENTER_PROFILES_3D[center_index]
    anatomy = _downsampled_anatomy()
    (output_dir / profile.name / "images").mkdir(parents=True)
    (output_dir / profile.name / "labels").mkdir(parents=True)
    for case in range(cases_per_center):
        rng = np.random.default_rng([seed, center_index, case])
        image, labels = _render_case(profile, anatomy, rng)
        name = f"{profile.name}_{case:03d}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(image, affine_3d()), output_dir / profile.name / "images" / name)
        nibabel.save(nibabel.Nifti1Image(labels, affine_3d()), output_dir / profile.name / "labels" / name)


def generate_synthetic_volumes(output_dir: str | Path, seed: int = 0, cases_per_center: int = 12) -> Path:
    """Write the dataset to `output_dir` (which must not exist yet): `cases_per_center` cases per center, the
    centers in parallel over the available cores. Deterministic given `seed`."""
    output_dir = Path(output_dir)
    parameters = _parameters(seed, cases_per_center)
    output_dir.mkdir(parents=True, exist_ok=False)
    workers = max(1, min(len(CENTERS_3D), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [
            pool.submit(_write_center, output_dir, seed, index, cases_per_center) for index in range(len(CENTERS_3D))
        ]
        for job in jobs:
            job.result()
    info = dict(parameters, centers=list(CENTERS_3D), id2label=ID2LABEL_3D, channels=["anatomy", "uptake"])
    (output_dir / "info.json").write_text(json.dumps(info, indent=2))
    return output_dir


def synthetic_volumes_dir(cache_dir: str | Path | None = None, seed: int = 0, cases_per_center: int = 12) -> Path:
    """The cached dataset folder with these parameters, generated on first use (atomically)."""
    if cache_dir is None:
        root = os.environ.get("PEFT_MEDSEG_CACHE")
        cache_dir = Path(root) / "synthetic3d" if root else Path.home() / ".cache" / "peft_medseg" / "synthetic3d"
    digest = hashlib.sha1(json.dumps(_parameters(seed, cases_per_center), sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"v{GENERATOR_VERSION}-{digest}"
    if not (target / "info.json").is_file():
        with atomic_directory(target) as staging:
            staging.rmdir()  # generate_synthetic_volumes creates its own folder
            generate_synthetic_volumes(staging, seed, cases_per_center)
    return target
