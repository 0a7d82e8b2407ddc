"""Base segmentation models: named offline configs (`tiny`, `small`, `beit-tiny`, `segformer-tiny`) and Hub backbones
under an UperNet head; the 3D named configs (`unetr-tiny`, `swin-unetr-tiny`, ...) are MONAI's networks from
`peft_medseg.models3d`."""

from __future__ import annotations

from torch import nn
from transformers import (
    MODEL_FOR_BACKBONE_MAPPING,
    AutoConfig,
    BeitConfig,
    BeitForSemanticSegmentation,
    Dinov2Config,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SegformerImageProcessorPil,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from .data.volumes import VolumePreprocessing
from .models3d import (
    DEFAULT_IN_CHANNELS,
    NAMED_VOLUME_CONFIGS,
    build_volume_model,
    named_volume_roi_size,
    volume_num_labels,
)

# Named configs build a DINOv2-style encoder under an UperNet head from scratch, offline. `small` is ViT-S sized.
NAMED_CONFIGS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        patch_size=8,
        head_channels=64,
    ),
    # Encoder-heavy, like a real pretrained backbone under a slim head (head ~4% of the parameters, vs 68% in `tiny`),
    # at a size that still trains on 2 CPU cores.
    "tiny-encoder": dict(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        patch_size=8,
        head_channels=16,
    ),
    "small": dict(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        head_channels=256,
    ),
}


def _out_features(num_layers: int) -> list[str]:
    # Four evenly spaced stages, ending with the last block, as UperNet expects four feature maps.
    step = num_layers // 4
    return [f"stage{step * (i + 1)}" for i in range(3)] + [f"stage{num_layers}"]


def named_config(
    name: str | dict, num_labels: int, image_size: int = 224, id2label: dict[int, str] | None = None
) -> UperNetConfig:
    """The `UperNetConfig` of a named offline base (`tiny` or `small`), with a DINOv2 backbone.

    `name` may also be a spec of the same keys as `NAMED_CONFIGS` values (widths for benchmarks, e.g. ViT-B).
    """
    if isinstance(name, str) and name not in NAMED_CONFIGS:
        raise ValueError(f"Unknown named config {name!r}: expected one of {sorted(NAMED_CONFIGS)} or a Hub model id.")
    spec = dict(NAMED_CONFIGS[name] if isinstance(name, str) else name)
    head_channels = spec.pop("head_channels")
    backbone = Dinov2Config(
        image_size=image_size,
        out_features=_out_features(spec["num_hidden_layers"]),
        reshape_hidden_states=True,
        **spec,
    )
    id2label = id2label or {i: str(i) for i in range(num_labels)}
    return UperNetConfig(
        backbone_config=backbone,
        hidden_size=head_channels,
        auxiliary_in_channels=backbone.hidden_size,
        use_auxiliary_head=False,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )


# A SegFormer with MiT-b0 widths and one block per stage, for key/value prompts offline (see prompt_mode="key_value").
SEGFORMER_TINY = dict(hidden_sizes=[32, 64, 160, 256], depths=[1, 1, 1, 1], decoder_hidden_size=64)
# `tiny`'s encoder widths in transformers' BEiT for semantic segmentation: its FPN turns the 8x8 token grid of a 64 px
# image into 32/16/8/4 px maps (transposed convs up, max-pool down), so the UperNet head decodes at half the input
# resolution instead of `tiny`'s 1/8. On the embedded data this lifts the base's in-distribution Dice from 0.65-0.67
# to 0.83 (README, `make demo`); the encoder is a plain ViT too, so token prompts work on it unchanged.
BEIT_TINY = dict(
    {key: value for key, value in NAMED_CONFIGS["tiny"].items() if key != "head_channels"},
    out_indices=[1, 2, 3, 4],
    use_relative_position_bias=True,
    use_auxiliary_head=False,
)
# Named 2D bases that are not a DINOv2 spec: built by their own transformers class.
OTHER_NAMED_BASES = ("beit-tiny", "segformer-tiny")


def build_segmentation_model(
    base: str | dict,
    num_labels: int,
    image_size: int = 224,
    id2label: dict[int, str] | None = None,
    in_channels: int = DEFAULT_IN_CHANNELS,
) -> nn.Module:
    """A segmentation model to pretrain: a named offline config (`tiny`, `small`, `beit-tiny`, `segformer-tiny`), a
    spec of the same keys as `NAMED_CONFIGS` values (DINOv2 widths under an UperNet head, e.g. ViT-B), a Hub backbone
    id, or a 3D named config (`NAMED_VOLUME_CONFIGS`: MONAI's UNETR / Swin UNETR with `in_channels` input channels).

    A Hub id (for example `facebook/dinov2-small`) loads that pretrained backbone under a freshly initialised
    UperNet head.
    """
    if isinstance(base, str) and base in NAMED_VOLUME_CONFIGS:
        return build_volume_model(base, num_labels, in_channels)
    if isinstance(base, dict) or base in NAMED_CONFIGS:
        return UperNetForSemanticSegmentation(named_config(base, num_labels, image_size, id2label))
    if base in OTHER_NAMED_BASES:
        id2label = id2label or {i: str(i) for i in range(num_labels)}
        labels = dict(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
        if base == "beit-tiny":
            return BeitForSemanticSegmentation(BeitConfig(image_size=image_size, **BEIT_TINY, **labels))
        return SegformerForSemanticSegmentation(SegformerConfig(**SEGFORMER_TINY, **labels))
    backbone_config = AutoConfig.from_pretrained(base)
    num_layers = backbone_config.num_hidden_layers
    # The backbone class of the config, loaded directly: AutoBackbone.from_pretrained asks the Hub whether the name
    # is a repo first, which fails for local folders and offline.
    backbone_class = MODEL_FOR_BACKBONE_MAPPING[type(backbone_config)]
    backbone = backbone_class.from_pretrained(base, out_features=_out_features(num_layers), reshape_hidden_states=True)
    id2label = id2label or {i: str(i) for i in range(num_labels)}
    config = UperNetConfig(
        backbone_config=backbone.config,
        hidden_size=512,
        auxiliary_in_channels=backbone.config.hidden_size,
        use_auxiliary_head=False,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    model = UperNetForSemanticSegmentation(config)
    model.backbone.load_state_dict(backbone.state_dict())
    return model


# Normalisation of the offline bases trained from scratch (named configs): grey images, centred.
SCRATCH_MEAN, SCRATCH_STD = 0.5, 0.25


def image_processor_for(
    base: str | dict, image_size: int, num_channels: int = DEFAULT_IN_CHANNELS, id2label: dict | None = None
):
    """The image processor for a base to pretrain: a pretrained backbone (Hub id or folder) keeps its own image
    statistics (`image_mean`/`image_std` of its image processor), which it was trained with; named configs are
    trained from scratch with `SCRATCH_MEAN`/`SCRATCH_STD`. The size is `image_size` either way.

    A 3D named config gets its `VolumePreprocessing` instead: patches of the model's size (`num_channels` input
    channels), volumes kept at their own voxel size."""
    if isinstance(base, str) and base in NAMED_VOLUME_CONFIGS:
        roi_size = named_volume_roi_size(base)
        return VolumePreprocessing(roi_size=roi_size, num_channels=num_channels, id2label=id2label or {})
    if isinstance(base, dict) or base in NAMED_CONFIGS or base in OTHER_NAMED_BASES:
        return build_image_processor(image_size)
    from transformers import AutoImageProcessor

    pretrained = AutoImageProcessor.from_pretrained(base)
    return build_image_processor(image_size, list(pretrained.image_mean), list(pretrained.image_std))


def build_image_processor(
    image_size: int, mean: float | list[float] = SCRATCH_MEAN, std: float | list[float] = SCRATCH_STD
):
    """The image processor (Pillow backend: no torchvision needed) saved with a base: fixed-size resize, rescale to
    [0, 1], normalise; labels kept as ids."""
    mean = [mean] * 3 if isinstance(mean, float) else list(mean)
    std = [std] * 3 if isinstance(std, float) else list(std)
    return SegformerImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std, do_reduce_labels=False
    )


def model_num_labels(model: nn.Module) -> int:
    """The number of classes a segmentation model predicts: its config's `num_labels`, or a 3D model's outputs."""
    config_labels = getattr(getattr(model, "config", None), "num_labels", None)
    return int(config_labels) if config_labels is not None else volume_num_labels(model)
