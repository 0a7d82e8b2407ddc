"""Reproduce the protocol of Saeed et al. 2023 (leave-one-center-out) on our data: direct inference, partial
(classifier / decoder), full fine-tuning, shallow and deep visual prompts, and LoRA, on the same split, seeds and
epoch budget; plus a few-shot curve (VPT-deep vs full).

    python recipes/reproduce_paper.py --quick                                  # CI-sized, minutes on 2 CPU cores
    python recipes/reproduce_paper.py --output_dir outputs/paper/synthetic     # embedded data, 3 seeds
    python recipes/reproduce_paper.py --dataset ../shared/data/breast_us --held_out busi \\
        --centers busi busbra_logiq7 busbra_logiq5 busbra_aplio300 --output_dir outputs/paper/breast_us

Writes runs.jsonl (one line per finished run: an interrupted reproduction continues where it stopped), runs.csv,
summary.md / summary.csv (one table per held-out center) and figure-<center>.png. Bases are cached per split.
"""

from __future__ import annotations

import argparse

from peft_medseg.paper import PAPER_METHODS, ProtocolConfig, run_protocol
from peft_medseg.paper_report import summarize
from peft_medseg.storage import claim_output_dir
from peft_medseg.training import METHODS
from peft_medseg.training.cli import run_recipe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset", default="synthetic", help="'synthetic', a folder <root>/<center>/images|masks, or a datasets id."
    )
    parser.add_argument(
        "--held_out",
        nargs="+",
        default=None,
        help="New centers, one split each (default: the synthetic held-out center).",
    )
    parser.add_argument("--centers", nargs="+", default=None, help="Centers to use (default: all).")
    parser.add_argument(
        "--methods", nargs="+", default=list(PAPER_METHODS), choices=["direct", *METHODS], help="Default: the paper's."
    )
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--few_shot_cases", nargs="*", type=int, default=[1, 5, 10], help="Few-shot sizes (plus all).")
    parser.add_argument("--base", default="tiny", help="Named base config (tiny, small) or a Hub backbone id.")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--pretrain_epochs", type=int, default=40)
    parser.add_argument("--finetune_epochs", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_virtual_tokens", type=int, default=10)
    parser.add_argument(
        "--learning_rate",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="Per-method learning rates, e.g. full=1e-3 vpt-deep=3e-2 (default: DEFAULT_LEARNING_RATES). Choose them "
        "on validation Dice, never on the test split.",
    )
    parser.add_argument("--quick", action="store_true", help="One seed, short budgets, no few-shot curve: for CI.")
    parser.add_argument("--output_dir", default="outputs/paper")
    return parser.parse_args(argv)


def parse_learning_rates(pairs: list[str]) -> dict[str, float]:
    rates = {}
    for pair in pairs:
        method, _, value = pair.partition("=")
        if method not in METHODS or not value:
            raise ValueError(f"--learning_rate {pair!r}: expected METHOD=LR with METHOD in {list(METHODS)}.")
        try:
            rates[method] = float(value)
        except ValueError:
            raise ValueError(f"--learning_rate {pair!r}: {value!r} is not a number.") from None
    return rates


def main(argv=None) -> None:
    args = parse_args(argv)
    held_out = args.held_out
    if held_out is None:
        from peft_medseg.data.synthetic import HELD_OUT_CENTER

        held_out = [HELD_OUT_CENTER]
    cfg = ProtocolConfig(
        dataset=args.dataset,
        held_out=held_out,
        centers=args.centers,
        methods=args.methods,
        seeds=args.seeds,
        few_shot_cases=[*args.few_shot_cases, None],
        base=args.base,
        image_size=args.image_size,
        pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        num_virtual_tokens=args.num_virtual_tokens,
        lora_rank=args.lora_rank,
        learning_rates=parse_learning_rates(args.learning_rate),
    )
    if args.quick:
        cfg.seeds, cfg.few_shot_cases, cfg.pretrain_epochs, cfg.finetune_epochs = (0,), (None,), 15, 8
    with claim_output_dir(args.output_dir):
        rows = run_protocol(cfg, args.output_dir)
        print(summarize(rows, args.output_dir))
    print(f"Wrote {args.output_dir}/summary.md, summary.csv, runs.csv and figure PNGs.")


if __name__ == "__main__":
    run_recipe(main)
