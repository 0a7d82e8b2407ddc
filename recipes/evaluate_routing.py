r"""Measure routing by center signatures: accuracy per center, unknown-center rejection, and Dice under routing.

    # The demo's adapter (with its signature) + signatures of the old centers, on the embedded data:
    python recipes/evaluate_routing.py --base_model outputs/demo/base --adapters outputs/demo/center-flair_1p5t \
        --signature_centers t1w_3t t1w_1p5t t1w_3t_lowres pdw_1p5t --output_dir outputs/demo/routing

    # Signatures only (no adapters needed), real data: two institutions, five scanners:
    python recipes/evaluate_routing.py --base_model BASE --dataset ../shared/data/breast_us \
        --signature_centers busi busbra_logiq7 busbra_logiq5 busbra_aplio300 --output_dir outputs/routing/breast_us \
        --institutions busi=Cairo busbra_logiq7=Rio busbra_logiq5=Rio busbra_aplio300=Rio busbra_usystems=Rio

    # 3D: the demo3d base and adapter, signatures of the base's own centers (volumes routed by their central patch):
    python recipes/evaluate_routing.py --base_model outputs/demo3d/base --adapters outputs/demo3d/center-flair_pet_e \
        --dataset synthetic3d --signature_centers t1_pet_a t1_pet_b t2_pet_c pd_pet_d --output_dir outputs/demo3d/routing

Signatures of `--signature_centers` are computed from the data's training split (as finetune_center.py does);
adapters bring their own. Test centers without a signature are unknown and should be rejected to the base. Writes
routing.md, routing.csv, routing.png (nearest-center confusion) and routing.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from peft_medseg.data import load_multicenter_dataset, select_centers
from peft_medseg.experiments.routing_eval import evaluate_routing, write_routing_report
from peft_medseg.models import model_num_labels
from peft_medseg.models3d import VolumePreprocessing
from peft_medseg.prediction import expand_adapters, load_adapters
from peft_medseg.routing import CenterRouter, CenterSignature, signature_path
from peft_medseg.storage import claim_output_dir, load_base
from peft_medseg.training import center_signature, eval_transform
from peft_medseg.training.cli import DataArguments, parse_arguments, run_recipe


@dataclass
class RoutingArguments:
    """The base, the adapters or centers to route between, and where the report goes."""

    base_model: str = field(metadata={"help": "Folder or Hub id of the base model."})
    output_dir: str = field(metadata={"help": "Where routing.md/.csv/.png/.json go."})
    adapters: list[str] = field(
        default_factory=list, metadata={"help": "Adapters with signatures (named by center), for Dice under routing."}
    )
    signature_centers: list[str] = field(
        default_factory=list, metadata={"help": "Centers whose signatures are computed from the training split."}
    )
    test_centers: list[str] | None = field(default=None, metadata={"help": "Test centers (default: all)."})
    false_rejection_rate: float = field(default=0.05, metadata={"help": "Of computed signatures' thresholds."})
    institutions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "CENTER=INSTITUTION pairs: also report routing between institutions (scanners of one "
            "institution may be indistinguishable, and may not need to be)."
        },
    )


def main(argv: list[str] | None = None) -> None:
    args, data_args = parse_arguments((RoutingArguments, DataArguments), argv, description=__doc__)
    base, processor = load_base(args.base_model)
    num_labels = model_num_labels(base)
    volumes = isinstance(processor, VolumePreprocessing)  # a 3D base: whole volumes, routed by their central patch
    data, _ = load_multicenter_dataset(data_args.dataset, num_labels=num_labels, volumes=volumes)
    # Each adapter is named by the center its signature was made on, so that test rows know their oracle adapter.
    adapters, signatures = {}, {}
    for location in expand_adapters(args.adapters).values():
        signature = CenterSignature.load(signature_path(location))
        if signature.center in adapters:
            raise ValueError(
                f"{location}: a second adapter for center {signature.center!r} (also {adapters[signature.center]})."
            )
        adapters[signature.center], signatures[signature.center] = location, signature
    if signatures:
        CenterRouter(signatures).check_base(base)
    test = data["test"] if args.test_centers is None else select_centers(data["test"], args.test_centers)
    groups = dict(pair.split("=", 1) for pair in args.institutions if "=" in pair)
    if len(groups) != len(args.institutions):
        raise ValueError(f"--institutions {args.institutions}: expected CENTER=INSTITUTION pairs.")
    with claim_output_dir(args.output_dir):
        for center in args.signature_centers:
            if center not in signatures:
                signatures[center] = center_signature(
                    base, processor, data, center, data_args.validation_fraction, args.false_rejection_rate
                )
        model = load_adapters(base, adapters)
        test.set_transform(eval_transform(processor))
        # Signature centers without an adapter are the base's own: recognised, and served by the base.
        summary = evaluate_routing(model, signatures, test, num_labels, adapters=list(adapters), groups=groups)
        print(write_routing_report(summary, args.output_dir, title=str(data_args.dataset)))
        (Path(args.output_dir) / "routing.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Wrote {args.output_dir}/routing.md, routing.csv, routing.png, routing.json.")


if __name__ == "__main__":
    run_recipe(main)
