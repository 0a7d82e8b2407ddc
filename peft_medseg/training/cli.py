"""Command lines of the recipes: `HfArgumentParser` over argument dataclasses, config files, one-line errors.

Each recipe declares its own arguments as a dataclass and shares `DataArguments`, `AccelerateArguments` and
`TrainingConfig` (the training loop's settings). `parse_arguments` reads them from the command line, or from one
JSON/YAML file (`python recipes/finetune_center.py config.yaml`) whose keys are the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

DEBUG_FLAG = "--debug"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the recipe's docstring (its examples) as written."""


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class DataArguments:
    """Which data, and how its labels read."""

    dataset: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (the embedded simulated multi-center brain MRI, generated on first use), a folder "
            "<root>/<center>/images|masks (e.g. ../shared/data/breast_us), or a datasets id / save_to_disk folder."
        },
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Number of classes (default: from the data, or from the base model)."}
    )
    label_map: list[str] | None = field(
        default=None,
        metadata={"help": "Rewrite mask values to class ids first, VALUE=ID, e.g. 255=1 for 0/255 masks."},
    )
    validation_fraction: float = field(
        default=0.2,
        metadata={"help": "Share of each center's training cases held out for validation and best-epoch selection."},
    )
    augmentation: bool = field(default=True, metadata={"help": "Random augmentation of training rows."})


@dataclass
class AccelerateArguments:
    """What `make_accelerator` takes from the command line."""

    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Autocast precision."})
    report_to: str | None = field(
        default=None, metadata={"help": "Tracker for accelerate, e.g. 'tensorboard' (pip install tensorboard)."}
    )


def parse_arguments(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    description: str | None = None,
) -> tuple:
    """The recipe's dataclasses, from `argv` or from a single JSON/YAML file given as the only argument.

    `defaults` are the recipe's own defaults for shared fields (e.g. more epochs for pretraining). Unknown keys in a
    config file, and unknown options, are errors naming them.
    """
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=HelpFormatter)
    parser.set_defaults(**(defaults or {}))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv[0])
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as error:
            raise ValueError(f"{path}: unreadable config file ({error}).") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of argument names to values.")
        try:
            return parser.parse_dict({**(defaults or {}), **values})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    return parser.parse_args_into_dataclasses(argv)


def run_recipe(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run a recipe's `main`: an error at the edges (bad data, model, adapter, config or output folder) ends the
    program with one line on stderr naming the file, field or value and what was expected, and exit status 2.

    `--debug` anywhere on the command line shows the full traceback instead. Anything else (a bug) keeps its
    traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        status = main(argv)
    except (ValueError, OSError) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message} (--debug for the traceback)", file=sys.stderr)
        sys.exit(2)
    if isinstance(status, int):
        sys.exit(status)


def resolve_training_config(config, output_dir: str, learning_rate: float):
    """`config` with the recipe's defaults filled in: the learning rate, and checkpoints in `<output_dir>-checkpoints`."""
    return dataclasses.replace(
        config,
        learning_rate=config.learning_rate if config.learning_rate is not None else learning_rate,
        checkpoint_dir=config.checkpoint_dir or f"{str(output_dir).rstrip('/')}-checkpoints",
    )
