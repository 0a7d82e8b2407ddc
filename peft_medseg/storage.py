"""Where peft_medseg meets the disk: names that may become paths, claims on output folders, atomic folder writes,
and saving and loading models (only safetensors and JSON are ever read back: nothing we load is unpickled).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .models3d import (
    VOLUME_PREPROCESSING_NAME,
    VolumePreprocessing,
    default_volume_preprocessing,
    is_volume_base,
    load_volume_model,
)
from .visual_prompt import PEFT_TYPE_NAME, VisualPromptConfig, read_adapter_config
from .visual_prompt.files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

EVALUATION_FILENAME = "evaluation.json"
MODEL_CONFIG_NAME = "config.json"
# A name that comes from data (a center, an adapter) and may become part of a path: no separators, no "..", no
# leading dot or dash, printable ASCII only.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
# Files a loader would have to unpickle; they are refused wherever we load a folder.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "EVALUATION_FILENAME",
    "OutputDirError",
    "atomic_directory",
    "check_no_pickle",
    "check_safe_name",
    "claim_output_dir",
    "is_adapter_folder",
    "load_base",
    "load_finetuned",
    "recover_interrupted_write",
    "save_base",
    "save_finetuned",
]


class OutputDirError(OSError):
    """An output folder that cannot be used: not writable, no space, not a folder, or taken by another run."""


# ----------------------------------------------------------------------------- names
def check_safe_name(name: Any, what: str = "center name") -> str:
    """`name` if it can be used as one path component; a `ValueError` naming it otherwise.

    Names from data (center names, adapter names) are joined into output paths: a name such as `x/../../VICTIM` would
    write outside the output folder, so such names are refused rather than rewritten.
    """
    if not isinstance(name, str) or not SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} cannot be used in a file name: expected 1-128 characters from letters, digits, '.', "
            "'_', '+' and '-', starting with a letter or digit, without '..'. Rename it in the data."
        )
    return name


# ----------------------------------------------------------------------------- output folders
@contextmanager
def claim_output_dir(path: str | Path, min_free_bytes: int = 16 * 2**20) -> Iterator[Path]:
    """Check, before any work, that `path` can be written, and hold it against other runs until the block ends.

    Refuses (with `OutputDirError` naming the folder) a path that exists and is not a folder, a parent that cannot be
    created or written, less than `min_free_bytes` free space, and a folder that another running process has
    claimed (an advisory lock on `.<name>.lock` next to it, released by the kernel when that process dies).
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a folder; expected an output folder.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise OutputDirError(
            f"{path.parent}: cannot write the output folder here ({error.strerror or error})."
        ) from error
    free = shutil.disk_usage(path.parent).free
    if free < min_free_bytes:
        raise OutputDirError(
            f"{path.parent}: {free / 2**20:.1f} MiB free, fewer than the {min_free_bytes / 2**20:.0f} MiB needed."
        )
    lock_path = path.parent / f".{path.name}.lock"
    handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the lifetime of the claim
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise OutputDirError(
            f"{path}: another run (pid {holder}) is writing this folder; wait for it or choose another output folder."
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ----------------------------------------------------------------------------- atomic writes
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # no renameat2, or a file system that cannot exchange
    raise OSError(code, os.strerror(code), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted_write(target: str | Path) -> None:
    """Finish or clean up what a killed `atomic_directory` left next to `target`.

    Where the system cannot swap folders in one step, replacing a folder takes two renames; a kill between them
    leaves the old folder at `.<name>.old-<pid>-*/<name>`: it is put back. Staging folders of dead writers are removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for leftover in sorted(target.parent.iterdir()):
        match = pattern.match(leftover.name)
        if not match or _pid_alive(int(match.group(2))):
            continue
        saved = leftover / target.name
        if match.group(1) == "old" and saved.is_dir() and not target.exists():
            os.rename(saved, target)
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success it replaces `target` in one step.

    A loader looking at `target` sees the old complete folder or the new complete one, never a half-written one and
    never none: the new folder is swapped in with one `renameat2(RENAME_EXCHANGE)` (Linux), or, where that is not
    available, with two renames whose interruption the next write or load repairs (`recover_interrupted_write`).
    On an exception (or a kill) only a hidden `.<name>.tmp-<pid>-*` folder is left, removed by the next write.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes it 0o700; a saved model is as readable as any other folder
        if not target.exists():
            os.rename(staging, target)
        elif not _exchange(staging, target):
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.rename(target, trash / target.name)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        # After a swap the staging path holds the old folder.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- reading folders
def check_no_pickle(folder: str | Path) -> None:
    """Refuse a folder holding files a loader would have to unpickle (they can run code when loaded)."""
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise ValueError(
            f"{found[0]}: a pickle-based file; peft_medseg reads only safetensors and JSON and never unpickles "
            f"({len(found)} such file(s) in {folder}). Remove them, or recreate the folder with this version."
        )


def is_adapter_folder(path: str | Path) -> bool:
    """Whether `path` holds a peft adapter (adapter_config.json) rather than a full model."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def _looks_local(path: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path


def load_base(path: str | Path):
    """A saved base segmentation model and its image processor, in eval mode (safetensors only, never pickle).

    `path` is a folder written by `pretrain_base.py` (or `save_pretrained`) or a Hub model id. A 3D base folder
    (`UNETR3D`/`SwinUNETR3D.save_pretrained`, with or without `volume_preprocessing.json`) gives MONAI's network
    (`peft_medseg.models3d`) and its `VolumePreprocessing`.
    A missing folder, a folder without a model, or an adapter folder given as a base raise an error naming the path.
    """
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    text = str(path)
    local = Path(text).expanduser()
    recover_interrupted_write(local)
    if local.is_dir():
        if is_adapter_folder(local):
            raise ValueError(
                f"{local}: an adapter folder ({ADAPTER_CONFIG_NAME}), not a base model; pass the base it was trained "
                "on as the base model and this folder as the adapter."
            )
        if not (local / MODEL_CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{local}: not a model folder (no {MODEL_CONFIG_NAME}); expected a base saved by pretrain_base.py."
            )
    elif local.exists() or _looks_local(text):
        raise FileNotFoundError(
            f"{text}: no such model folder; expected a base saved by pretrain_base.py or a Hub id."
        )
    has_preprocessing = (local / VOLUME_PREPROCESSING_NAME).is_file()
    if has_preprocessing or is_volume_base(local):
        # A 3D base; saved by `UNETR3D.save_pretrained` alone, it gets the preprocessing its shape implies.
        check_no_pickle(local)
        model = load_volume_model(local)
        preprocessing = VolumePreprocessing.from_pretrained(local) if has_preprocessing else None
        return model, preprocessing or default_volume_preprocessing(model)
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(text, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(text)
    except OSError as error:
        where = "folder" if local.is_dir() else "Hub model id"
        raise FileNotFoundError(f"{text}: cannot load a segmentation model from this {where} ({error}).") from error
    return model.eval(), processor


def load_finetuned(path: str | Path, base_model: str | Path) -> nn.Module:
    """A fine-tuned model in eval mode: `PeftModel.from_pretrained(base, path)` for an adapter, else the full model."""
    path = Path(path)
    recover_interrupted_write(path)
    if is_adapter_folder(path):
        from peft import PeftModel

        check_no_pickle(path)
        config = read_adapter_config(path)
        if config.get("peft_type") == PEFT_TYPE_NAME:
            VisualPromptConfig.from_pretrained(str(path))  # every field checked before the base is touched
        base, _ = load_base(base_model)
        return PeftModel.from_pretrained(base, str(path)).eval()
    model, _ = load_base(path)
    return model


# ----------------------------------------------------------------------------- writing folders
def save_base(model: nn.Module, image_processor, folder: str | Path, records: dict[str, Any] | None = None) -> Path:
    """Save a base model with its image processor atomically; `records` are JSON files written next to them
    (`{"train_log.json": {...}}`), so that a folder and what it was trained on never disagree."""
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging)
        image_processor.save_pretrained(staging)
        for name, record in (records or {}).items():
            check_safe_name(name, "record file name")
            (staging / name).write_text(json.dumps(record, indent=2) + "\n")
    return Path(folder)


def save_finetuned(
    model: nn.Module,
    output_dir: str | Path,
    image_processor=None,
    evaluation: dict[str, Any] | None = None,
    attachments: Sequence[Callable[[Path], Any]] = (),
) -> Path:
    """Save a fine-tuned model atomically: the adapter for a peft model, else the full model (`save_pretrained`).

    The image processor (full models only: an adapter uses its base's) and the evaluation JSON go in the same folder;
    each of `attachments` is called with the staging folder to write more files (a center signature) before the
    folder is swapped in, so the adapter and what travels with it are replaced together.
    """
    from peft import PeftModel

    with atomic_directory(output_dir) as staging:
        model.save_pretrained(staging)
        if image_processor is not None and not isinstance(model, PeftModel):
            image_processor.save_pretrained(staging)
        if evaluation is not None:
            (staging / EVALUATION_FILENAME).write_text(json.dumps(evaluation, indent=2, allow_nan=True) + "\n")
        for attach in attachments:
            attach(staging)
    return Path(output_dir)
