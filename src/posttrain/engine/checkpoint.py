"""Resumable training checkpoints, without pickle.

A checkpoint is a directory ``<output_dir>/checkpoints/step-00000012/`` holding::

    trainable.safetensors    parameters with requires_grad, keyed by named_parameters() name
    optimizer.safetensors    optimizer tensor state, keyed "state.<param index>.<key>"
    optimizer.json           the rest of optimizer.state_dict(): non-tensor state and param_groups
    scheduler.json           scheduler.state_dict()
    rng-rank<R>.json         python / numpy / torch CPU (/ CUDA) RNG states of rank R
    trainer_state.json       the caller's dict plus "step"
    dcp/, dcp_rest.json      instead of trainable/optimizer.*, for a sharded (FSDP) run: every process's shards,
                             written by torch.distributed.checkpoint as safetensors (engine/sharding.py)
    COMPLETE                 written last; only directories holding it count as checkpoints

Nothing is pickled: ``torch.save``/``torch.load`` can execute code on load, so tensors go to safetensors
and everything else to JSON.

Why the save is atomic: the main process writes into a hidden sibling ``.tmp-step-00000012/`` and
renames it into place with ``os.replace`` only once ``COMPLETE`` is in it. A crash mid-save therefore
leaves at most a ``.tmp-*`` directory, which :func:`latest_checkpoint` never considers and the next
save removes.

Frozen parameters are not saved: they are whatever the model loader produces, so a resumed run must
build the model the same way (same base weights, same adapter config).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import PosttrainError

CHECKPOINTS_DIRNAME = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_TENSORS_FILE = "optimizer.safetensors"
OPTIMIZER_JSON_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
TRAINER_STATE_FILE = "trainer_state.json"

_STEP_DIR_RE = re.compile(r"^step-(\d+)$")
_RNG_FILE_RE = re.compile(r"^rng-rank(\d+)\.json$")
_TMP_PREFIX = ".tmp-"
# A param_groups value that was a tensor is stored in optimizer.safetensors and referenced like this.
_TENSOR_REF = "__tensor__"


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """The directory that :func:`save_checkpoint` writes for ``step``."""
    return Path(output_dir) / CHECKPOINTS_DIRNAME / f"step-{step:08d}"


def is_complete_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a ``step-*`` directory whose save finished (it holds ``COMPLETE``)."""
    path = Path(path)
    return _STEP_DIR_RE.match(path.name) is not None and (path / COMPLETE_MARKER).is_file()


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    trainer_state: dict,
    keep_last: int,
    rank: int = 0,
    is_main: bool = True,
    sharded: bool = False,
) -> Path:
    """Save everything needed to resume after optimizer step ``step``; return the checkpoint dir.

    Single process: call it with the defaults. With several processes, every rank calls it and the
    caller puts barriers around the main rank's save::

        if is_main:
            save_checkpoint(..., rank=rank, is_main=True)   # model, optimizer, scheduler, own RNG
        barrier()                                            # the final directory now exists
        if not is_main:
            save_checkpoint(..., rank=rank, is_main=False)  # only writes rng-rank<rank>.json
        barrier()                                            # before anyone saves or prunes again

    The main rank writes into a temporary sibling directory and renames it into place, then deletes
    complete checkpoints older than the newest ``keep_last`` (never the one just written). The other
    ranks write only their RNG file, straight into the final directory (see :func:`save_rng_state`).
    ``model`` must be the unwrapped module (no DDP ``module.`` prefix), so names match on load.

    ``sharded``: the parameters and optimizer state are already in the staging directory that
    :func:`begin_checkpoint` made (every process wrote its shards there); only the rest is written.
    """
    if keep_last < 1:
        raise PosttrainError(f"keep_last must be >= 1 (got {keep_last}); it is how many checkpoints to keep")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    final_dir = checkpoint_dir(output_dir, step)
    if not is_main:
        save_rng_state(final_dir, rank)
        return final_dir

    # Serialise everything before touching the disk, so an unserialisable state fails cleanly.
    json_files = {}
    if not sharded:
        optimizer_tensors, optimizer_json = _flatten_optimizer_state(optimizer.state_dict())
        json_files[OPTIMIZER_JSON_FILE] = _to_json(optimizer_json, "the optimizer state")
    json_files |= {
        SCHEDULER_FILE: _to_json(scheduler.state_dict(), "the scheduler state"),
        f"rng-rank{rank}.json": json.dumps(_capture_rng_state()),
        TRAINER_STATE_FILE: _to_json({**trainer_state, "step": step}, "trainer_state"),
    }

    if sharded:
        tmp_dir = staging_dir(output_dir, step)
        if not tmp_dir.is_dir():
            raise PosttrainError(f"sharded checkpoint of step {step}: {tmp_dir} was not prepared "
                                 "(begin_checkpoint first, then every process saves its shards there)")
    else:
        tmp_dir = begin_checkpoint(output_dir, step)
        trainable = {
            name: param.detach().cpu().contiguous()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        _save_safetensors(trainable, tmp_dir / TRAINABLE_FILE)
        _save_safetensors(optimizer_tensors, tmp_dir / OPTIMIZER_TENSORS_FILE)
    for filename, text in json_files.items():
        _write_text(tmp_dir / filename, text)
    _write_text(tmp_dir / COMPLETE_MARKER, f"{step}\n")  # last: its presence means the rest is on disk

    if final_dir.exists():
        # Re-saving a step (e.g. after resuming from it): move the old one aside first, because
        # os.replace cannot replace a non-empty directory.
        stale = final_dir.with_name(f"{_TMP_PREFIX}old-{final_dir.name}")
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final_dir, stale)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(stale)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)

    _prune(final_dir.parent, keep_last=keep_last, keep=final_dir)
    return final_dir


def begin_checkpoint(output_dir: Path, step: int) -> Path:
    """Main process: a fresh hidden staging directory for step ``step`` (where every process then writes its
    shards, before :func:`save_checkpoint` with ``sharded=True`` completes and renames it)."""
    tmp_dir = staging_dir(output_dir, step)
    tmp_dir.parent.mkdir(parents=True, exist_ok=True)
    if tmp_dir.exists():  # left behind by a crashed save of the same step
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    return tmp_dir


def staging_dir(output_dir: Path, step: int) -> Path:
    """Where :func:`begin_checkpoint` stages step ``step``: a hidden sibling of its final directory."""
    final_dir = checkpoint_dir(output_dir, step)
    return final_dir.with_name(_TMP_PREFIX + final_dir.name)


def save_rng_state(ckpt_dir: Path, rank: int) -> Path:
    """Write this process's RNG states to ``ckpt_dir/rng-rank<rank>.json``; return the file.

    Used by non-main ranks, after a barrier that follows the main rank's :func:`save_checkpoint`, so
    ``ckpt_dir`` is the already-renamed, complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise PosttrainError(
            f"cannot save rank {rank}'s RNG state: {ckpt_dir} does not exist; the main rank must call "
            "save_checkpoint first, with a barrier before the other ranks save"
        )
    path = ckpt_dir / f"rng-rank{rank}.json"
    tmp_path = path.with_name(_TMP_PREFIX + path.name)
    _write_text(tmp_path, json.dumps(_capture_rng_state()))
    os.replace(tmp_path, path)
    return path


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``output_dir/checkpoints``, or None."""
    complete = _complete_checkpoints(Path(output_dir) / CHECKPOINTS_DIRNAME)
    return complete[-1][1] if complete else None


def resolve_resume(output_dir: Path, resume: bool | str | os.PathLike) -> Path | None:
    """Which checkpoint a run should resume from.

    ``False``: none (fresh start). ``True``: the latest complete checkpoint in ``output_dir``, or None
    when there is none yet (also a fresh start). A path: that checkpoint directory, or the latest
    checkpoint of the output directory it names; it is an error if it has none.
    """
    if resume is False:
        return None
    if resume is True:
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not path.exists():
        raise PosttrainError(f"resume: {path} does not exist; give a checkpoint directory or an output_dir")
    if _STEP_DIR_RE.match(path.name):
        _check_complete(path)
        return path
    for root in (path / CHECKPOINTS_DIRNAME, path):
        complete = _complete_checkpoints(root)
        if complete:
            return complete[-1][1]
    raise PosttrainError(
        f"resume: {path} holds no complete checkpoint (a {CHECKPOINTS_DIRNAME}/step-* directory with a "
        f"{COMPLETE_MARKER} file); give a checkpoint directory, or set resume to true/false"
    )


def load_checkpoint(
    path: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int = 0,
) -> dict:
    """Restore trainable parameters, optimizer, scheduler and RNG state; return the trainer state.

    ``model``, ``optimizer`` and ``scheduler`` must be built the way the saved run built them. The
    trainable parameters must match the saved ones exactly (same names and shapes); frozen parameters
    are left as loaded. RNG states come from ``rng-rank<rank>.json``, or from the lowest rank's file
    when this rank has none (e.g. the world size grew).
    """
    from posttrain.engine import sharding

    path = Path(path)
    _check_complete(path)

    if sharding.has_sharded_state(path):  # an FSDP run's checkpoint: loads sharded or not, any process count
        sharding.load_sharded(path, model, optimizer)
    elif sharding.is_sharded(model):
        raise PosttrainError(
            f"resume: {path} was saved by a data-parallel (ddp) run, and this run shards with fsdp; resume it with "
            "distributed.strategy=ddp (an fsdp checkpoint resumes under either)")
    else:
        _load_plain(path, model, optimizer)
    scheduler.load_state_dict(_read_json(path / SCHEDULER_FILE))

    _restore_rng_state(_read_json(_rng_file_for(path, rank)))
    return _read_json(path / TRAINER_STATE_FILE)


def _load_plain(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    _load_trainable(model, load_file(str(path / TRAINABLE_FILE)), source=path / TRAINABLE_FILE)
    optimizer_state = _unflatten_optimizer_state(
        load_file(str(path / OPTIMIZER_TENSORS_FILE)),
        _read_json(path / OPTIMIZER_JSON_FILE),
        template=optimizer.state_dict(),
    )
    try:
        optimizer.load_state_dict(optimizer_state)
    except ValueError as error:
        raise PosttrainError(
            f"{path / OPTIMIZER_JSON_FILE} does not fit this optimizer ({error}); resume with the same "
            "trainable parameters and parameter groups as the saved run"
        ) from error


# ---------------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)


def _flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-able tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        non_tensors: dict[str, Any] = {}
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                non_tensors[key] = value
        state_json[str(index)] = non_tensors
    param_groups = []
    for group_index, group in enumerate(state_dict["param_groups"]):
        group_json = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor lr with capturable/fused optimizers
                name = f"param_groups.{group_index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                value = {_TENSOR_REF: name}
            group_json[key] = value
        param_groups.append(group_json)
    return tensors, {"state": state_json, "param_groups": param_groups}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], state_json: dict, template: dict) -> dict:
    """Inverse of :func:`_flatten_optimizer_state`.

    ``template`` is the live optimizer's state_dict: JSON turned its tuples (AdamW's ``betas``) into
    lists, and they are turned back so the restored state_dict equals the saved one.
    """
    state: dict[int, dict[str, Any]] = {int(index): dict(rest) for index, rest in state_json["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("state."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    param_groups = []
    for group_index, group in enumerate(state_json["param_groups"]):
        template_group = (
            template["param_groups"][group_index] if group_index < len(template["param_groups"]) else {}
        )
        restored = {}
        for key, value in group.items():
            if isinstance(value, dict) and set(value) == {_TENSOR_REF}:
                value = tensors[value[_TENSOR_REF]]
            elif isinstance(value, list) and isinstance(template_group.get(key), tuple):
                value = tuple(value)
            restored[key] = value
        param_groups.append(restored)
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------------------------------
# Trainable parameters


def _load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: Path) -> None:
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"trainable parameters missing from the checkpoint: {_preview(missing)}")
        if unexpected:
            parts.append(f"checkpoint parameters that are not trainable in this model: {_preview(unexpected)}")
        raise PosttrainError(
            f"{source}: {'; '.join(parts)}. Resume with the same model and adapter config as the saved run"
        )
    for name, param in trainable.items():
        if saved[name].shape != param.shape:
            raise PosttrainError(
                f"{source}: parameter {name!r} has shape {tuple(saved[name].shape)} in the checkpoint but "
                f"{tuple(param.shape)} in the model. Resume with the same model config as the saved run"
            )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------
# RNG state


def _capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss_next],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached_gaussian)],
        "torch_cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    np_name, np_keys, np_pos, np_has_gauss, np_cached_gaussian = state["numpy"]
    np.random.set_state((np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        # A run resumed on fewer GPUs restores the devices it has; one resumed on CPU skips CUDA.
        for device, device_state in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(device_state, dtype=torch.uint8), device)


def _rng_file_for(ckpt_dir: Path, rank: int) -> Path:
    own = ckpt_dir / f"rng-rank{rank}.json"
    if own.is_file():
        return own
    ranks = sorted(int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _RNG_FILE_RE.match(p.name)))
    if not ranks:
        raise PosttrainError(f"{ckpt_dir} has no rng-rank*.json file; the checkpoint is damaged")
    return ckpt_dir / f"rng-rank{ranks[0]}.json"


# ---------------------------------------------------------------------------------------------------
# Directory bookkeeping


def _complete_checkpoints(checkpoints_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint directly under ``checkpoints_root``, by step."""
    if not checkpoints_root.is_dir():
        return []
    found = []
    for child in checkpoints_root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise PosttrainError(f"{path} is not a checkpoint directory (it does not exist or is a file)")
    if not _STEP_DIR_RE.match(path.name):
        raise PosttrainError(
            f"{path} is not a checkpoint directory; checkpoints are named like "
            f"<output_dir>/{CHECKPOINTS_DIRNAME}/step-00000012"
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise PosttrainError(
            f"{path} is an incomplete checkpoint (no {COMPLETE_MARKER} file: its save was interrupted); "
            "resume from an earlier checkpoint"
        )


def _prune(checkpoints_root: Path, *, keep_last: int, keep: Path) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, and crashed saves' temp dirs."""
    complete = _complete_checkpoints(checkpoints_root)
    newest = {path for _, path in complete[-keep_last:]}
    for _, path in complete:
        if path in newest or path == keep:
            continue
        # Unmark first, so a crash mid-delete leaves an ignored directory, not a broken "complete" one.
        (path / COMPLETE_MARKER).unlink()
        shutil.rmtree(path)
    for child in checkpoints_root.iterdir():
        # Only the main rank writes here, and it has finished its save: any temp dir is a crash's leftover.
        if child.name.startswith(_TMP_PREFIX) and child.is_dir():
            shutil.rmtree(child)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, indent=2)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what} must be JSON-serialisable to be checkpointed: {error}") from error


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist a rename: on POSIX the directory entry itself must be synced."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
