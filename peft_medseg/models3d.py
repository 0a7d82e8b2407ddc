"""3D base models: MONAI's UNETR and Swin UNETR with `save_pretrained` / `from_pretrained` and named offline configs.

`UNETR3D` and `SwinUNETR3D` are MONAI's networks, unchanged (same modules, same forward, same state dict), with
`huggingface_hub.PyTorchModelHubMixin`: a base saves as `config.json` (the constructor's arguments) and
`model.safetensors`, loads from a folder or a Hub id, and an adapter trained on the wrapper loads onto a plain
`monai.networks.nets.UNETR` of the same shape and the other way round.

```py
>>> base = peft_medseg.models3d.build_volume_model("unetr-tiny", num_labels=3)   # 2-channel input by default
>>> base.save_pretrained("outputs/base3d")
>>> base = peft_medseg.models3d.load_volume_model("outputs/base3d")
>>> model = get_peft_model(base, VisualPromptConfig(num_virtual_tokens=10))      # deep VPT of UNETR's ViT
```

`VolumePreprocessing` is what a 3D base expects of its input (patch size, voxel size, channels), saved next to it as
`volume_preprocessing.json`, the 3D counterpart of a transformers image processor.

MONAI's UNETR needs the optional `einops` package (`pip install "monai[einops]"`, a dependency of peft_medseg).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

VOLUME_PREPROCESSING_NAME = "volume_preprocessing.json"
HUB_TAGS = ["peft_medseg", "medical-imaging", "segmentation", "3d", "monai"]


class UNETR3D(UNETR, PyTorchModelHubMixin, library_name="monai", tags=[*HUB_TAGS, "unetr"]):
    """MONAI's `UNETR` (Hatamizadeh et al. 2022) with `save_pretrained` / `from_pretrained` / `push_to_hub`.

    Takes MONAI's arguments (`in_channels`, `out_channels`, `img_size`, `hidden_size`, ...); `forward(pixel_values)`
    maps (B, in_channels, *img_size) to logits (B, out_channels, *img_size), like MONAI's `forward(x_in)`. The ViT
    reads 16³ patches, and the decoder reads its hidden states 3, 6 and 9, which visual prompts never reach (they
    are stripped inside each block).
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return super().forward(pixel_values)


class SwinUNETR3D(SwinUNETR, PyTorchModelHubMixin, library_name="monai", tags=[*HUB_TAGS, "swin-unetr"]):
    """MONAI's `SwinUNETR` (Hatamizadeh et al. 2022) with `save_pretrained` / `from_pretrained` / `push_to_hub`.

    Window attention over 7³-voxel windows of 2³ patches; visual prompts join it as keys/values
    (`VisualPromptConfig(prompt_mode="key_value")`). Inputs need every spatial size divisible by 32; training and
    sliding-window inference use `SWIN_UNETR_ROI_SIZE` patches.
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return super().forward(pixel_values)


# The patch size of Swin UNETR in training and sliding-window inference (any multiple of 32 works).
SWIN_UNETR_ROI_SIZE = (64, 64, 64)
VOLUME_MODEL_CLASSES: dict[str, type[nn.Module]] = {"UNETR": UNETR3D, "SwinUNETR": SwinUNETR3D}

# Named offline configs, trained from scratch; two input channels (like PET/CT) by default. `unetr-tiny` trains on
# 2 CPU cores; `unetr-small` has ViT-S widths; `unetr-base` is the paper's ViT-B (hidden 768, 12 heads, MLP 3072).
# Their decoders use affine InstanceNorms (MONAI's default has no affine): per-center norms can then adapt them.
AFFINE_INSTANCE_NORM = ("instance", {"affine": True})
NAMED_VOLUME_CONFIGS: dict[str, dict] = {
    "unetr-tiny": dict(
        architecture="UNETR",
        hidden_size=96,
        mlp_dim=192,
        num_heads=4,
        feature_size=8,
        img_size=(64, 64, 64),
        norm_name=AFFINE_INSTANCE_NORM,
    ),
    "unetr-small": dict(
        architecture="UNETR",
        hidden_size=384,
        mlp_dim=1536,
        num_heads=6,
        feature_size=16,
        img_size=(96, 96, 96),
        norm_name=AFFINE_INSTANCE_NORM,
    ),
    "unetr-base": dict(
        architecture="UNETR",
        hidden_size=768,
        mlp_dim=3072,
        num_heads=12,
        feature_size=16,
        img_size=(96, 96, 96),
        norm_name=AFFINE_INSTANCE_NORM,
    ),
    "swin-unetr-tiny": dict(
        architecture="SwinUNETR",
        feature_size=12,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        norm_name=AFFINE_INSTANCE_NORM,
    ),
}
DEFAULT_IN_CHANNELS = 2


def build_volume_model(name: str | dict, num_labels: int, in_channels: int = DEFAULT_IN_CHANNELS) -> nn.Module:
    """A 3D base to pretrain: a named config (`NAMED_VOLUME_CONFIGS`) or a spec with the same keys
    (`architecture` plus MONAI's constructor arguments), with `num_labels` output channels."""
    if isinstance(name, str) and name not in NAMED_VOLUME_CONFIGS:
        raise ValueError(f"Unknown 3D base {name!r}: expected one of {sorted(NAMED_VOLUME_CONFIGS)} or a folder.")
    spec = dict(NAMED_VOLUME_CONFIGS[name] if isinstance(name, str) else name)
    architecture = spec.pop("architecture")
    if architecture not in VOLUME_MODEL_CLASSES:
        raise ValueError(f"architecture {architecture!r}: expected one of {sorted(VOLUME_MODEL_CLASSES)}.")
    return VOLUME_MODEL_CLASSES[architecture](in_channels=in_channels, out_channels=num_labels, **spec)


def volume_model_class(config: dict) -> type[nn.Module]:
    """The 3D model class whose constructor takes exactly the arguments saved in a base's `config.json`."""
    for model_class in VOLUME_MODEL_CLASSES.values():
        parameters = set(inspect.signature(model_class.__init__).parameters) - {"self"}
        required = {
            name
            for name, p in inspect.signature(model_class.__init__).parameters.items()
            if p.default is inspect.Parameter.empty and name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
        }
        if set(config) <= parameters and required <= set(config):
            return model_class
    raise ValueError(
        f"config.json with arguments {sorted(config)} fits none of {sorted(VOLUME_MODEL_CLASSES)}' constructors."
    )


def load_volume_model(name_or_path: str | Path, **hub_kwargs) -> nn.Module:
    """A 3D base saved with `save_pretrained` (folder or Hub id), in eval mode; its class is read off config.json."""
    folder = Path(name_or_path)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: missing; a 3D base folder holds config.json + model.safetensors.")
    else:
        config_file = Path(hf_hub_download(str(name_or_path), "config.json", **hub_kwargs))
    try:
        config = json.loads(config_file.read_text())
    except ValueError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object of constructor arguments.")
    model = volume_model_class(config).from_pretrained(str(name_or_path), **hub_kwargs)
    model.name_or_path = str(name_or_path)
    return model.eval()


def is_volume_base(name_or_path: str | Path) -> bool:
    """Whether a base name is a named 3D config or a folder holding a saved 3D base."""
    if str(name_or_path) in NAMED_VOLUME_CONFIGS:
        return True
    config_file = Path(name_or_path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text())
        volume_model_class(config)
    except ValueError:
        return False
    return True


def _monai_network(model: nn.Module) -> nn.Module:
    # A peft model or a LoRA/VPT-wrapped base: the network itself.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_volume_model(model: nn.Module) -> bool:
    """Whether `model` (or the base of a peft model) is one of the 3D networks (MONAI's UNETR or Swin UNETR)."""
    return isinstance(_monai_network(model), (UNETR, SwinUNETR))


def volume_encoder_states(model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The transformer encoder's hidden states of a 3D model for `pixel_values` (B, C, D, H, W): UNETR's token states
    (B, N, hidden) after each block (its `hidden_states_out`), or Swin UNETR's feature maps (B, C, d, h, w) per stage."""
    network = _monai_network(model)
    if isinstance(network, UNETR):
        _, states = network.vit(pixel_values)
        return list(states)
    return list(network.swinViT(pixel_values, network.normalize))


def volume_roi_size(model: nn.Module) -> tuple[int, int, int]:
    """The patch a 3D model segments at once: UNETR's `img_size` (its position embedding is sized to it), or
    `SWIN_UNETR_ROI_SIZE` for Swin UNETR."""
    network = _monai_network(model)
    if isinstance(network, UNETR):
        return tuple(int(f * p) for f, p in zip(network.feat_size, network.patch_size))
    return SWIN_UNETR_ROI_SIZE


def named_volume_roi_size(name: str) -> tuple[int, int, int]:
    """The patch size of a named 3D config, read off the config without building the network."""
    spec = NAMED_VOLUME_CONFIGS[name]
    return tuple(spec["img_size"]) if spec["architecture"] == "UNETR" else SWIN_UNETR_ROI_SIZE


def volume_num_labels(model: nn.Module) -> int:
    """Output channels of a 3D model (its final 1x1x1 conv `out`)."""
    convs = [m for m in _monai_network(model).out.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return int(convs[-1].out_channels)


def volume_in_channels(model: nn.Module) -> int:
    """Input channels of a 3D model (its first convolution's)."""
    conv = next(m for m in _monai_network(model).modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return int(conv.in_channels)


@dataclass
class VolumePreprocessing:
    """What a 3D base expects of its input, saved with it (`volume_preprocessing.json`).

    Args:
        roi_size: the patch size the model sees in training and in each sliding window (voxels).
        spacing: voxel size (mm) volumes are resampled to before anything else; None keeps each volume's own.
        num_channels: input channels (2 for PET/CT-like pairs).
        positive_fraction: share of training crops centred on a foreground voxel (the rest on background).
        sliding_window_overlap: overlap of neighbouring windows at inference (Gaussian-weighted blending).
    """

    roi_size: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] | None = None
    num_channels: int = 2
    positive_fraction: float = 0.5
    sliding_window_overlap: float = 0.25
    id2label: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_channels, bool) or not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {self.num_channels!r}.")
        self.roi_size = tuple(int(v) for v in self.roi_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {self.roi_size}.")
        if self.spacing is not None:
            self.spacing = tuple(float(v) for v in self.spacing)
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"spacing must be None or three positive voxel sizes (mm), got {self.spacing}.")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}.")
        if not 0.0 <= self.sliding_window_overlap < 1.0:
            raise ValueError(f"sliding_window_overlap must be in [0, 1), got {self.sliding_window_overlap}.")
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    def save_pretrained(self, folder: str | Path) -> None:
        (Path(folder) / VOLUME_PREPROCESSING_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VolumePreprocessing:
        path = Path(folder) / VOLUME_PREPROCESSING_NAME
        try:
            values = json.loads(path.read_text())
            return cls(**values)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{path}: not a valid volume preprocessing file ({error}).") from error


def default_volume_preprocessing(model: nn.Module) -> VolumePreprocessing:
    """The preprocessing a 3D model's shape implies, for a base saved without `volume_preprocessing.json`: its
    patch size and input channels, volumes at their own voxel size."""
    return VolumePreprocessing(roi_size=volume_roi_size(model), num_channels=volume_in_channels(model))
