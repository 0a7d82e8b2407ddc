"""Which center's adapter an image needs: center signatures and the `CenterRouter`.

A center's signature is a summary of the *frozen base's* features on that center's training images (a volume: its
central patch of the 3D model's own size, `volume_routing_input`): the channel
means and standard deviations of a few encoder hidden states (the statistics a scanner, preset or camera shifts),
projected onto `ROUTING_DIM` fixed random directions, and their mean and shrunk inverse covariance. Distances are
Mahalanobis distances in that feature space, not softmax confidences, which stay high under covariate shift. (On the
embedded data, the full covariance separated an unknown contrast at AUROC 0.96-0.98 where per-feature variances
reached 0.72; projecting to 128 dimensions keeps that and a signature at 64 KB.) Each signature carries its own rejection threshold, calibrated on the center's
validation images at a chosen false-rejection rate, and the base's answer to a fixed probe input, so that a
signature is never used with another base.

The router assigns each image to the center with the smallest calibrated distance (distance / threshold) and
rejects it to the base (`"__base__"`) when even that exceeds 1. Its `adapter_names` feed a mixed-center batch
directly: routing and prediction are one pass.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .models3d import is_volume_model, volume_encoder_states, volume_roi_size
from .storage import check_safe_name
from .visual_prompt import BASE_ADAPTER_NAME

SIGNATURE_FILENAME = "center_signature.safetensors"
SIGNATURE_FORMAT = "peft_medseg.center_signature/1"
# Hidden states summarised per image: evenly spaced from the patch embeddings (where intensity shifts show first)
# to the last block.
NUM_FEATURE_LEVELS = 4
# Features are projected onto this many fixed random orthonormal directions (Johnson-Lindenstrauss) before their
# covariance is estimated: a few hundred images cannot estimate a covariance of thousands of features.
ROUTING_DIM = 128
# Shrinks the covariance towards a scaled identity (Ledoit-Wolf style, fixed weight).
COVARIANCE_SHRINKAGE = 0.2
DEFAULT_FALSE_REJECTION_RATE = 0.05
# Largest relative difference of the probe features that still counts as the same base (float noise across machines).
PROBE_TOLERANCE = 1e-3


def _hidden_states(model: nn.Module, pixel_values: torch.Tensor) -> Sequence[torch.Tensor]:
    from peft import PeftModel

    def run():
        if is_volume_model(model):
            return volume_encoder_states(model, pixel_values)
        return getattr(model(pixel_values=pixel_values, output_hidden_states=True), "hidden_states", None)

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            states = run()
    else:
        states = run()
    if not states:
        raise ValueError(
            f"{type(model).__name__} returns no hidden_states with output_hidden_states=True: the router needs the "
            "encoder's hidden states."
        )
    return states


@torch.no_grad()
def base_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, D) routing features of the frozen base (adapters disabled): channel means and standard deviations of
    `NUM_FEATURE_LEVELS` evenly spaced hidden states, tokens (B, N, C) or maps (B, C, H, W) / (B, C, D, H, W)."""
    was_training = model.training
    model.eval()
    try:
        states = _hidden_states(model, pixel_values)
    finally:
        model.train(was_training)
    levels = torch.linspace(0, len(states) - 1, min(NUM_FEATURE_LEVELS, len(states))).round().long().tolist()
    parts = []
    for level in levels:
        state = states[level].double()
        values = state.flatten(2).transpose(1, 2) if state.dim() >= 4 else state  # (B, N, C)
        parts += [values.mean(dim=1), values.std(dim=1)]
    return torch.cat(parts, dim=1)


@functools.cache
def routing_projection(num_features: int) -> torch.Tensor:
    """(num_features, min(num_features, ROUTING_DIM)) fixed orthonormal projection, the same on every machine.

    Cached: every distance of every signature uses it (treat the returned tensor as read-only)."""
    if num_features <= ROUTING_DIM:
        return torch.eye(num_features, dtype=torch.float64)
    generator = torch.Generator().manual_seed(num_features)
    gaussian = torch.randn(num_features, ROUTING_DIM, generator=generator, dtype=torch.float64)
    return torch.linalg.qr(gaussian).Q


def probe_pixel_values(image_size: tuple[int, ...], num_channels: int = 3) -> torch.Tensor:
    """A fixed input (2, num_channels, *image_size) whose base features identify the base a signature was made with."""
    generator = torch.Generator().manual_seed(20231)
    return torch.randn(2, num_channels, *image_size, generator=generator)


def volume_routing_input(model: nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """(1, C, *roi) what a preprocessed volume (C, D, H, W) is routed by: its central patch of the 3D model's own
    size (`volume_roi_size`), zero-padded where the volume is smaller. One patch per volume, for its signature's
    statistics, its calibration and its routing alike."""
    from monai.transforms import ResizeWithPadOrCrop

    patch = ResizeWithPadOrCrop(volume_roi_size(model))(volume)
    return torch.as_tensor(patch)[None]


@dataclass
class CenterSignature:
    """The frozen base's feature statistics on one center, with its calibrated rejection threshold."""

    center: str
    mean: torch.Tensor  # (K,) projected features
    precision: torch.Tensor  # (K, K) inverse of the shrunk covariance
    threshold: float
    false_rejection_rate: float
    num_images: int
    num_calibration_images: int
    probe_features: torch.Tensor  # (2, D): the base's features of `probe_pixel_values(image_size, num_channels)`
    image_size: tuple[int, ...]  # (H, W), or a 3D model's patch (D, H, W)
    num_channels: int = 3

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) Mahalanobis distance of `base_features` (B, D) to this center, divided by sqrt(K)."""
        if features.shape[-1] != self.probe_features.shape[-1]:
            raise ValueError(
                f"signature of {self.center!r} has {self.probe_features.shape[-1]} features, the base gives "
                f"{features.shape[-1]}: it was made with another base."
            )
        centered = features.double() @ routing_projection(features.shape[-1]) - self.mean.double()
        squared = torch.einsum("bi,ij,bj->b", centered, self.precision.double(), centered)
        return (squared.clamp_min(0) / self.mean.numel()).sqrt()

    def check_base(self, model: nn.Module, source: str | Path | None = None) -> None:
        """Raise a ValueError (naming `source`) unless `model` is the base this signature was made with."""
        probe = probe_pixel_values(self.image_size, self.num_channels)
        self.check_probe(base_features(model, probe.to(_device(model))), source)

    def check_probe(self, probe: torch.Tensor, source: str | Path | None = None) -> None:
        """`check_base` given the base's features of `probe_pixel_values(self.image_size, self.num_channels)`."""
        where = f"{source}: " if source is not None else ""
        if probe.shape != self.probe_features.shape or not torch.allclose(
            probe.cpu(), self.probe_features.double(), rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE
        ):
            raise ValueError(
                f"{where}the signature of center {self.center!r} was made with another base model (its features of "
                "a fixed probe input differ): recompute it with the base the adapter was trained on."
            )

    def save(self, folder: str | Path) -> Path:
        """Write `SIGNATURE_FILENAME` into `folder` (safetensors: tensors plus JSON metadata, no pickle)."""
        path = Path(folder) / SIGNATURE_FILENAME
        metadata = {
            "format": SIGNATURE_FORMAT,
            "center": self.center,
            "threshold": repr(self.threshold),
            "false_rejection_rate": repr(self.false_rejection_rate),
            "num_images": str(self.num_images),
            "num_calibration_images": str(self.num_calibration_images),
            "image_size": json.dumps(list(self.image_size)),
            "num_channels": str(self.num_channels),
        }
        tensors = {"mean": self.mean, "precision": self.precision, "probe_features": self.probe_features}
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CenterSignature:
        """Read a signature file; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no center signature; finetune_center.py saves one next to each adapter (older adapters: "
                "recompute it with peft_medseg.routing.compute_signature)."
            )
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ValueError(f"{path}: not a readable safetensors center signature ({error}).") from error
        if metadata.get("format") != SIGNATURE_FORMAT:
            raise ValueError(
                f"{path}: metadata 'format' is {metadata.get('format')!r}, expected {SIGNATURE_FORMAT!r}."
            )
        missing = sorted({"mean", "precision", "probe_features"} - set(tensors))
        if missing:
            raise ValueError(f"{path}: missing tensor(s) {missing}.")
        try:
            signature = cls(
                center=check_safe_name(metadata["center"], "signature center"),
                mean=tensors["mean"],
                precision=tensors["precision"],
                threshold=float(metadata["threshold"]),
                false_rejection_rate=float(metadata["false_rejection_rate"]),
                num_images=int(metadata["num_images"]),
                num_calibration_images=int(metadata["num_calibration_images"]),
                probe_features=tensors["probe_features"],
                image_size=tuple(int(s) for s in json.loads(metadata["image_size"])),
                num_channels=int(metadata.get("num_channels", 3)),  # signatures of 2D bases before 3D: RGB
            )
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{path}: bad or missing metadata field ({error}).") from error
        k = signature.mean.numel()
        if signature.precision.shape != (k, k) or signature.threshold <= 0:
            raise ValueError(f"{path}: 'precision' must be ({k}, {k}) for 'mean' of {k}, and 'threshold' positive.")
        return signature


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_signature(
    model: nn.Module,
    center: str,
    fit_batches: Iterable[torch.Tensor],
    calibration_batches: Iterable[torch.Tensor],
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
) -> CenterSignature:
    """The signature of `center` from the frozen base `model` (adapters are disabled while it looks).

    `fit_batches` (pixel_values of the center's training images) give the statistics; `calibration_batches` (its
    validation images, not used to fit) set the threshold: the (1 - false_rejection_rate) quantile of a normal fit
    to their distances (at least their empirical quantile), so that about that share of the center's own new images
    would be sent to the base.
    """
    check_safe_name(center, "center name")
    if not 0 < false_rejection_rate < 1:
        raise ValueError(f"false_rejection_rate must be in (0, 1), got {false_rejection_rate}.")
    device = _device(model)
    fit, image_size, num_channels = [], None, None
    for pixel_values in fit_batches:
        image_size, num_channels = tuple(pixel_values.shape[2:]), pixel_values.shape[1]
        fit.append(base_features(model, pixel_values.to(device)).cpu())
    if not fit or sum(len(f) for f in fit) < 2:
        raise ValueError(f"center {center!r}: a signature needs at least 2 training images.")
    features = torch.cat(fit) @ routing_projection(fit[0].shape[-1])
    mean = features.mean(dim=0)
    covariance = torch.cov(features.T).reshape(len(mean), len(mean))
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    covariance = (1 - COVARIANCE_SHRINKAGE) * covariance + COVARIANCE_SHRINKAGE * scale * torch.eye(len(mean))
    signature = CenterSignature(
        center=center,
        mean=mean,
        precision=torch.linalg.inv(covariance),
        threshold=1.0,
        false_rejection_rate=false_rejection_rate,
        num_images=len(features),
        num_calibration_images=0,
        probe_features=base_features(model, probe_pixel_values(image_size, num_channels).to(device)).cpu(),
        image_size=image_size,
        num_channels=num_channels,
    )
    distances = torch.cat([signature.distance(base_features(model, b.to(device)).cpu()) for b in calibration_batches])
    if distances.numel() == 0:
        raise ValueError(f"center {center!r}: a signature needs calibration (validation) images.")
    # A normal fit of the calibration distances, not their empirical quantile: a center often has only a few dozen
    # validation images, whose 95th percentile is little more than their maximum and moves with every image.
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - false_rejection_rate)))
    spread = float(distances.std()) if distances.numel() > 1 else 0.0
    signature.threshold = max(
        float(distances.mean()) + z * spread, float(torch.quantile(distances, 1 - false_rejection_rate))
    )
    signature.num_calibration_images = distances.numel()
    return signature


@dataclass
class Routes:
    """The router's answer for a batch: per image, the adapter to use and why."""

    adapter_names: list[str]  # a center, or "__base__" when rejected
    nearest: list[str]  # the nearest center, even when rejected
    distances: list[float]  # raw distance to the nearest center
    calibrated: list[float]  # distance / that center's threshold (> 1: rejected)
    all_calibrated: torch.Tensor  # (B, centers), in `CenterRouter.centers` order


class CenterRouter:
    """Route each image to the nearest center's adapter, or to the base when it is far from every center.

    >>> router = CenterRouter.from_adapters(["adapters/center-A", "adapters/center-B"])
    >>> router.check_base(model)                 # the signatures were made with this base
    >>> routes = router.route(model, pixel_values)
    >>> logits = model(pixel_values=pixel_values, adapter_names=routes.adapter_names).logits

    Keys of `signatures` are adapter names. Signatures of the centers the base was trained on can join as
    `base_centers`: their images are then recognised as known and go to the base, instead of being measured against
    the adapters' centers only.
    """

    def __init__(self, signatures: Mapping[str, CenterSignature], base_centers: Sequence[str] = ()):
        if not signatures:
            raise ValueError("a CenterRouter needs at least one center signature.")
        self.signatures = dict(signatures)
        unknown = sorted(set(base_centers) - set(self.signatures))
        if unknown:
            raise ValueError(f"base_centers {unknown} have no signature; signatures: {sorted(self.signatures)}.")
        # Centers the base was trained on: recognised (not rejected as foreign), and served by the base itself.
        self.base_centers = set(base_centers)
        sizes = {(s.num_channels, *s.image_size) for s in self.signatures.values()}
        if len(sizes) > 1:
            raise ValueError(
                f"signatures were made at different input shapes (channels, size) {sorted(sizes)}: one base, one shape."
            )

    @property
    def centers(self) -> list[str]:
        """The adapter names the router can choose, in the column order of `Routes.all_calibrated`."""
        return list(self.signatures)

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, str | Path] | Sequence[str | Path]) -> CenterRouter:
        """Load the signature saved next to each adapter (local folders or Hub ids); keyed by adapter name
        (a mapping's keys, else each signature's center)."""
        items = adapters.items() if isinstance(adapters, Mapping) else [(None, a) for a in adapters]
        signatures = {}
        for name, adapter in items:
            signature = CenterSignature.load(signature_path(adapter))
            key = name if name is not None else signature.center
            if key in signatures:
                raise ValueError(f"{adapter}: a second signature for adapter name {key!r}.")
            signatures[key] = signature
        return cls(signatures)

    def check_base(self, model: nn.Module) -> None:
        """Raise a ValueError unless every signature was made with `model`'s base."""
        # One probe pass for all: the signatures share one input size (checked in __init__).
        first = next(iter(self.signatures.values()))
        probe = base_features(model, probe_pixel_values(first.image_size, first.num_channels).to(_device(model)))
        for name, signature in self.signatures.items():
            signature.check_probe(probe, source=f"signature of adapter {name!r}")

    @torch.no_grad()
    def route(self, model: nn.Module, pixel_values: torch.Tensor) -> Routes:
        """Route a batch (B, C, H, W), or of `volume_routing_input` patches: features of the frozen base, nearest
        center by calibrated distance, reject."""
        return self.route_features(base_features(model, pixel_values).cpu())

    def route_features(self, features: torch.Tensor) -> Routes:
        """Route precomputed `base_features` (B, D); see `route`."""
        raw = torch.stack([s.distance(features) for s in self.signatures.values()], dim=1)
        thresholds = torch.tensor([s.threshold for s in self.signatures.values()], dtype=raw.dtype)
        calibrated = raw / thresholds
        best = calibrated.argmin(dim=1)
        centers = self.centers
        nearest = [centers[i] for i in best.tolist()]
        chosen = calibrated.gather(1, best[:, None])[:, 0]
        return Routes(
            adapter_names=[
                c if d <= 1.0 and c not in self.base_centers else BASE_ADAPTER_NAME
                for c, d in zip(nearest, chosen.tolist())
            ],
            nearest=nearest,
            distances=raw.gather(1, best[:, None])[:, 0].tolist(),
            calibrated=chosen.tolist(),
            all_calibrated=calibrated,
        )


def signature_path(adapter: str | Path) -> Path:
    """The signature file of an adapter: `<folder>/SIGNATURE_FILENAME`, or downloaded from the Hub repo `adapter`."""
    local = Path(adapter).expanduser()
    if local.is_dir():
        return local / SIGNATURE_FILENAME
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(adapter), SIGNATURE_FILENAME))
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"{adapter}: the Hub repo has no {SIGNATURE_FILENAME}.") from error
