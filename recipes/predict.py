r"""Segment images or volumes with a base and a center adapter, or route each scan to its center automatically.

    # One center's adapter on a folder of PNGs and a NIfTI volume:
    python recipes/predict.py --base_model outputs/demo/base --adapter outputs/demo/center-flair_1p5t \
        --output_dir outputs/predictions scans/*.png scans/case_0000.nii.gz

    # Several centers: each scan goes to the nearest center's adapter, or to the base when it is far from all:
    python recipes/predict.py --base_model outputs/demo/base --adapters outputs/centers/ --route auto \
        --output_dir outputs/predictions scans/

Inputs: PNG/JPEG/TIFF files, NIfTI (.nii, .nii.gz; nnU-Net channel files case_0000, case_0001 form one case), DICOM
series folders, folders of these and glob patterns. Writes <output_dir>/masks/ (PNG at the original size, NIfTI with
the input's affine and header; a DICOM series becomes NIfTI), overlays/ (PNG with a legend) and predictions.csv (per
input: the route, the router's distance, pixel/voxel counts and volumes in mm^3 per class). An existing output folder
is refused unless --overwrite; a failed run leaves it as it was.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from peft_medseg.prediction import AUTO, Predictor, find_scans, predict_to_folder
from peft_medseg.storage import OutputDirError
from peft_medseg.training.cli import HelpFormatter, run_recipe


@dataclass
class PredictArguments:
    """What to segment, with which base and adapters, and where the masks go."""

    base_model: str = field(metadata={"help": "Folder or Hub id of the base model."})
    output_dir: str = field(metadata={"help": "Where masks/, overlays/ and predictions.csv go (must not exist)."})
    inputs: list[str] = field(default_factory=list, metadata={"help": "Files, folders or glob patterns to segment."})
    adapter: str | None = field(default=None, metadata={"help": "One center's adapter (folder or Hub id)."})
    adapters: list[str] | None = field(
        default=None, metadata={"help": "Several adapters (folders, Hub ids, or a folder of adapter folders)."}
    )
    route: str | None = field(
        default=None, metadata={"help": "'auto' (by center signatures), an adapter name, or __base__."}
    )
    batch_size: int = field(default=16, metadata={"help": "Images or slices per forward pass."})
    overlays: bool = field(default=True, metadata={"help": "Also write overlay PNGs."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})


def main(argv: list[str] | None = None) -> None:
    # Inputs follow the options as plain positional arguments (files, folders, globs); anything else is an error.
    parser = HfArgumentParser(PredictArguments, description=__doc__, formatter_class=HelpFormatter)
    args, rest = parser.parse_args_into_dataclasses(
        sys.argv[1:] if argv is None else argv, return_remaining_strings=True
    )
    unknown = [arg for arg in rest if arg.startswith("--")]
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; see --help.")
    inputs = [*args.inputs, *rest]
    if not inputs:
        raise ValueError("no inputs: name files, folders or glob patterns to segment.")
    if args.adapter and args.adapters:
        raise ValueError("--adapter and --adapters: give one adapter, or several with --route.")
    adapters = [args.adapter] if args.adapter else list(args.adapters or [])
    if args.adapters and args.route is None:
        args.route = AUTO
    if Path(args.output_dir).exists() and not args.overwrite:
        raise OutputDirError(f"{args.output_dir}: already exists; choose another output folder or pass --overwrite.")
    find_scans(inputs)  # every input found and named before the models load
    predictor = Predictor(args.base_model, adapters, route=args.route, batch_size=args.batch_size, device=args.device)
    predict_to_folder(predictor, inputs, args.output_dir, overwrite=args.overwrite, overlays=args.overlays)
    print(f"Wrote {args.output_dir}/masks, {'overlays, ' if args.overlays else ''}predictions.csv.")


if __name__ == "__main__":
    run_recipe(main)
