"""Training-state checkpoints in safetensors and JSON only: resuming never unpickles anything.

accelerate's `save_state`/`load_state` store the optimizer, scheduler and RNG states with pickle (`load_state` calls
`torch.load(weights_only=False)`), so a crafted checkpoint folder runs code on resume. Checkpoints travel between
machines like adapters do; ours hold tensors in safetensors files and everything else in JSON:

- `trainable.safetensors`: the parameters being trained and every buffer (BatchNorm statistics) of the model;
- `optimizer.safetensors` + `optimizer.json`: the optimizer's per-parameter tensors, and its other state and groups;
- `scheduler.json`: the learning-rate scheduler's state;
- `rng-<rank>.safetensors` + `rng-<rank>.json`: the torch (CPU and CUDA), numpy and Python RNG states of each process;
- `scaler.json`: the fp16 gradient scaler, when there is one;
- `training_state.json`: the loop's position, history, best epoch and the fingerprint of the run it belongs to;
- `best.safetensors`: the trainable state of the best epoch so far.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..storage import check_no_pickle

STATE_FILENAME = "training_state.json"
BEST_FILENAME = "best.safetensors"
TRAINABLE_FILENAME = "trainable.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training changes: the parameters requiring grad and the buffers (BatchNorm statistics)."""
    state = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone().contiguous() for n, b in model.named_buffers()})
    return state


def run_fingerprint(model: nn.Module, settings: Mapping[str, Any], datasets: Mapping[str, Any]) -> dict[str, str]:
    """What identifies a run, so that resume can refuse a checkpoint of another one.

    `trainable`: the names and shapes of the trained parameters (the method and adapter config); `settings`: the
    optimisation settings given; `data`: the rows of each dataset (center and id, in order).
    """

    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    trainable = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    rows = {}
    for name, dataset in datasets.items():
        plain = dataset.with_format(None)  # the rows as stored, without the training transform
        ids = plain["id"] if "id" in plain.column_names else plain["case_id"]
        rows[name] = [len(plain), digest(list(zip(plain["center"], ids)))]
    return {"trainable": digest(trainable), "settings": digest(dict(settings)), "data": digest(rows)}


def check_same_run(folder: Path, recorded: Mapping[str, str] | None, current: Mapping[str, str]) -> None:
    """Refuse to resume from a checkpoint written by another run (method or adapter config, settings, data)."""
    meaning = {
        "trainable": "the trained parameters (method or adapter config)",
        "settings": "the training settings (learning rate, epochs, batch size, seed, ...)",
        "data": "the training or validation data",
    }
    differs = [meaning[key] for key in meaning if (recorded or {}).get(key) != current[key]]
    if differs:
        raise ValueError(
            f"{folder}: this checkpoint was written by another run; it differs in {', '.join(differs)}. Resume with "
            "the settings, method and data of that run, or start a new run (another --output_dir, or no "
            "--resume_from_checkpoint)."
        )


# ----------------------------------------------------------------------------- writing
def save_training_state(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    state: dict,
    best: dict[str, torch.Tensor] | None,
    write_shared: bool,
    rank: int,
) -> None:
    """Write one process's part of a checkpoint into `folder` (the shared files only where `write_shared`)."""
    tensors, extra = _rng_state()
    save_file(tensors, folder / f"rng-{rank}.safetensors")
    (folder / f"rng-{rank}.json").write_text(json.dumps(extra))
    if not write_shared:
        return
    save_file(trainable_state(model), folder / TRAINABLE_FILENAME)
    tensors, extra = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps(extra))
    (folder / "scheduler.json").write_text(json.dumps(_jsonable(scheduler.state_dict())))
    if scaler is not None:
        (folder / "scaler.json").write_text(json.dumps(_jsonable(scaler.state_dict())))
    if best is not None:
        save_file(best, folder / BEST_FILENAME)
    (folder / STATE_FILENAME).write_text(json.dumps(state, indent=2))


# ----------------------------------------------------------------------------- reading
def load_training_state(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler, rank: int
) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Restore a checkpoint written by `save_training_state`; returns the loop state and the best weights so far.

    Refuses a folder with pickle files in it, before reading anything.
    """
    check_no_pickle(folder)
    state = json.loads((folder / STATE_FILENAME).read_text())
    trained = load_file(folder / TRAINABLE_FILENAME)
    result = model.load_state_dict(trained, strict=False)
    expected = set(trainable_state(model))
    missing = sorted(expected & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder / TRAINABLE_FILENAME}: does not fit the model being trained (missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]})."
        )
    optimizer.load_state_dict(
        _join_optimizer_state(load_file(folder / "optimizer.safetensors"), _read_json(folder / "optimizer.json"))
    )
    scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
    if scaler is not None and (folder / "scaler.json").is_file():
        scaler.load_state_dict(_read_json(folder / "scaler.json"))
    rng = folder / f"rng-{rank}.safetensors"
    if not rng.is_file():  # a run resumed on more processes than it was written with
        rng = folder / "rng-0.safetensors"
    _set_rng_state(load_file(rng), _read_json(rng.with_suffix(".json")))
    best = load_file(folder / BEST_FILENAME) if (folder / BEST_FILENAME).is_file() else None
    return state, best


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable checkpoint file ({error}).") from error


# ----------------------------------------------------------------------------- pieces
def _jsonable(value: Any) -> Any:
    """A state dict's non-tensor parts as JSON values (tuples become lists; scalars stay scalars)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None  # e.g. the learning-rate lambdas, which the scheduler's own load_state_dict skips too


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": _jsonable(state_dict["param_groups"])}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], extra: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *extra["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, python_gauss = random.getstate()
    extra = {
        "numpy": [kind, int(position), int(has_gauss), float(gauss)],
        "python": [version, list(internal), python_gauss],
    }
    return tensors, extra


def _set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    kind, position, has_gauss, gauss = extra["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, python_gauss = extra["python"]
    random.setstate((version, tuple(internal), python_gauss))
