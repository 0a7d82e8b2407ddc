"""Reproduce the protocol of Saeed et al. 2023 (leave-one-center-out) on our data: direct inference, partial
(classifier / decoder), full fine-tuning, shallow and deep visual prompts, and LoRA, on the same split, seeds and
epoch budget; plus a few-shot curve (VPT-deep vs full).

    python recipes/reproduce_paper.py --quick                                  # CI-sized, minutes on 2 CPU cores
    python recipes/reproduce_paper.py --output_dir outputs/paper/synthetic     # embedded data, 3 seeds
    python recipes/reproduce_paper.py --dataset ../shared/data/breast_us --held_out busi \\
        --centers busi busbra_logiq7 busbra_logiq5 busbra_aplio300 --output_dir outputs/paper/breast_us
    # The paper's own setting: a 3D UNETR on two-channel volumes, two held-out centers (one base without each):
    python recipes/reproduce_paper.py --base unetr-tiny --dataset synthetic3d --held_out flair_pet_e t1_pet_f \
        --few_shot_cases 0 --output_dir outputs/paper/synthetic3d

Writes runs.jsonl (one line per finished run: an interrupted reproduction continues where it stopped), runs.csv,
summary.md / summary.csv (one table per held-out center, each method's share of full fine-tuning's gain with a 95%
bootstrap interval over the test images) and figure-<center>.png. Bases are cached per split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_medseg.experiments.paper import ProtocolConfig, run_protocol
from peft_medseg.experiments.paper_report import summarize
from peft_medseg.models3d import is_volume_base
from peft_medseg.storage import claim_output_dir
from peft_medseg.training.cli import parse_arguments, run_recipe


@dataclass
class ReproduceArguments:
    """Where the reproduction goes, and whether it is the CI-sized one."""

    output_dir: str = field(default="outputs/paper", metadata={"help": "runs.jsonl, summaries, figures, bases."})
    quick: bool = field(default=False, metadata={"help": "One seed, short budgets, no few-shot curve: for CI."})


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_arguments((ReproduceArguments, ProtocolConfig), argv, description=__doc__)
    if not cfg.held_out:
        from peft_medseg.data.synthetic import HELD_OUT_CENTER
        from peft_medseg.data.synthetic3d import HELD_OUT_CENTERS_3D

        cfg.held_out = list(HELD_OUT_CENTERS_3D) if is_volume_base(cfg.base) else [HELD_OUT_CENTER]
    if args.quick:
        cfg.seeds, cfg.few_shot_cases, cfg.pretrain_epochs, cfg.finetune_epochs = [0], [], 15, 8
    with claim_output_dir(args.output_dir):
        rows = run_protocol(cfg, args.output_dir)
        print(summarize(rows, args.output_dir))
    print(f"Wrote {args.output_dir}/summary.md, summary.csv, runs.csv and figure PNGs.")


if __name__ == "__main__":
    run_recipe(main)
