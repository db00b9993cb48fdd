"""FSDP2 sharding for every stage: which strategy a run uses, how a model is sharded, how it is gathered for
generation, and how sharded state is saved and loaded without pickle.

Why posttrain calls ``torch.distributed.fsdp.fully_shard`` itself instead of handing the model to accelerate's
FSDP plugin: with torch 2.13 (CPU build) and accelerate 1.16 the plugin does not engage on CPU processes
(``Accelerator(cpu=True)`` runs MULTI_CPU data parallel and ignores it; without ``cpu=True`` the state is
``DistributedType.NO``), so a CPU-tested path through it would test nothing. ``fully_shard`` is the same engine
accelerate's plugin calls on GPUs; accelerate still launches the processes, builds the process group, autocasts
and reduces metrics. ``accelerate launch --config_file`` with an FSDP config selects ``strategy: fsdp`` through
its environment (``ACCELERATE_USE_FSDP``) and its knobs map onto this section's (:func:`resolve`).

What is sharded (FSDP2 shards every parameter on dim 0 across the processes): each decoder layer is one FSDP unit
(its parameters all-gathered just before its forward and, with ``reshard_after_forward``, freed after it and
gathered again for backward); the root unit holds the rest (embeddings, final norm, the output head, a PPO value
head). QLoRA's 4-bit linears (bitsandbytes Params4bit) are left out of sharding (``ignored_params``: their
quantisation state lives outside the tensor) and stay whole on every process. Gradients are reduce-scattered (averaged over processes, as DDP's all-reduce is), so each process keeps
1/N of the gradients and, the optimizer being built on the sharded parameters, 1/N of AdamW's state. The engine's
normalisation (``loss * world / global_units``) is therefore unchanged. Frozen parameters (a LoRA base) are
sharded too: their memory is divided by N, and they get no gradients.

The lean head (models/forward.py) applies the output head after the model's forward returns. That is exact under
FSDP2 because the root unit is not resharded after forward (FSDP2 keeps the root's parameters gathered for the
backward that follows), and its gradient is reduce-scattered in the root's post-backward, which runs at the end
of the whole backward. Tested: 1 vs 2 processes give the same losses and gradient norms (tests/engine/test_fsdp.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from posttrain.errors import ConfigError

if TYPE_CHECKING:
    from posttrain.commands.base import TrainConfig

DCP_DIRNAME = "dcp"  # the sharded state inside a checkpoint directory
DCP_REST_FILE = "dcp_rest.json"  # the optimizer's non-tensor state (param_groups' hyperparameters)
_MODEL, _OPTIM = "model.", "optim."


# ------------------------------------------------------------------------------------------------ the strategy
def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes")


def resolve(cfg: TrainConfig) -> str:
    """The strategy the run uses: ``cfg.distributed.strategy``, where ``auto`` follows accelerate's launch config.

    ``accelerate launch --config_file fsdp.yaml`` exports ``ACCELERATE_USE_FSDP=true`` and the plugin's knobs; an
    explicit ``distributed.strategy=ddp`` beside it is a contradiction and stops the run, and the config's
    ``fsdp_reshard_after_forward`` / ``fsdp_offload_params`` apply where this config leaves ours at their defaults.
    Mutates ``cfg.distributed`` to the resolved values and returns the strategy."""
    d = cfg.distributed
    from_accelerate = _env_flag("ACCELERATE_USE_FSDP")
    if from_accelerate and d.strategy == "ddp":
        raise ConfigError("distributed.strategy: ddp, but accelerate launch was given an FSDP config "
                          "(ACCELERATE_USE_FSDP=true); drop one of the two")
    strategy = d.strategy
    if strategy == "auto":
        strategy = "fsdp" if from_accelerate else "ddp"
    if from_accelerate:
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"accelerate's FSDP config has fsdp_version {version}; posttrain shards with FSDP2: set "
                              "fsdp_version: 2 in the accelerate config")
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD")
        if reshard is not None and d.reshard_after_forward:  # ours at its default: accelerate's decides
            d.reshard_after_forward = reshard.strip().lower() not in ("false", "0", "no_shard", "shard_grad_op")
        if _env_flag("FSDP_OFFLOAD_PARAMS") and not d.offload:
            d.offload = True
        if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
            cfg.gradient_checkpointing = True
    d.strategy = strategy
    if strategy == "fsdp":
        check(cfg)
    return strategy


def check(cfg: TrainConfig) -> None:
    """What FSDP2 cannot do in posttrain, stopped before any compute."""
    if cfg.method in ("prompt", "prefix"):
        raise ConfigError(f"distributed.strategy=fsdp with method={cfg.method}: the virtual-token methods train "
                          "a few thousand parameters; use ddp")
    if cfg.precision == "fp16":
        raise ConfigError("distributed.strategy=fsdp with precision=fp16: fp16 needs a sharded gradient scaler, "
                          "which posttrain does not have; use precision=bf16 (or fp32)")
    if cfg.distributed.offload and not torch.cuda.is_available():
        raise ConfigError("distributed.offload=true: offloading moves sharded state from GPU to CPU memory, and "
                          "this machine has no GPU (on a CPU everything is in CPU memory already)")


def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (``python -m posttrain ...`` without torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------ sharding
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of ``model`` (inside PEFT / value-head wrappers): the modules whose class the
    transformers model names in ``_no_split_modules`` (LlamaDecoderLayer, Qwen3MoeDecoderLayer, ...)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"distributed.strategy=fsdp: found no decoder layers in {type(model).__name__} (no "
                          "_no_split_modules); this model family cannot be sharded per layer")
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, cfg: TrainConfig, *, frozen: bool = False) -> torch.nn.Module:
    """Apply FSDP2 in place: every decoder layer, then the root. ``frozen``: a forward-only copy (a full-FT
    reference), resharded after every forward and never offloaded."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    d = cfg.distributed
    kw: dict = {}
    if d.param_dtype != "auto":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, d.param_dtype),
                                               reduce_dtype=getattr(torch, d.reduce_dtype))
    if d.offload and not frozen:
        kw["offload_policy"] = CPUOffloadPolicy()
    reshard = True if frozen else d.reshard_after_forward
    # QLoRA: bitsandbytes' 4-bit weights keep their quantisation state outside the tensor, which sharding would
    # drop; they stay whole on every process (0.5 B/param) and everything else is sharded.
    kw["ignored_params"] = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} or None
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard, **kw)
    fully_shard(model, **kw)
    model._posttrain_reshard = reshard  # what gathered() restores
    return model


def units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block every parameter of a sharded ``model`` is whole on every process and forwards run no
    collectives, so processes may call the model a different number of times (generation: each process stops
    when its own completions end). Costs the full model's memory for the block. A no-op for an unsharded model."""
    mods = units(model)
    if not mods:
        yield model
        return
    reshard = getattr(model, "_posttrain_reshard", True)
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(reshard if m is not model else False, recurse=False)


def require_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """FSDP2's no_sync: skip the reduce-scatter on all but the last micro-batch of a step."""
    model.set_requires_gradient_sync(sync)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every process must call it), a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _saved_items(model: torch.nn.Module, only_trainable: bool) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a saved model holds: the state dict without tied duplicates (a tied head is saved
    as the embedding only, as save_pretrained does), or only the trainable parameters (an adapter)."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} if only_trainable else None
    tied = _tied(model)
    return [(k, v) for k, v in model.state_dict().items() if k not in tied and (keep is None or k in keep)]


def trainable_state_dict(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """The trainable parameters whole, on CPU, on the main process (empty elsewhere): what a PEFT adapter saves,
    gathered without gathering the frozen base. Every process must call it (one all-gather per tensor)."""
    out = {}
    for name, value in _saved_items(model, only_trainable=True):
        whole = full_tensor(value.detach())
        if is_main:
            out[name] = whole.cpu().clone()
    return out


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save_streaming(model: torch.nn.Module, path: Path, is_main: bool) -> None:
    """Write a sharded model's whole state dict as one ``path`` safetensors file, a tensor at a time.

    The header (names, dtypes, global shapes and byte offsets) is known from the shapes alone, so the main process
    writes it first and then each tensor as soon as it is gathered: the extra memory is one whole tensor, not the
    model (gathering the full state dict on the main process first, as FULL_STATE_DICT saving does, raised the peak
    RSS of a 2-process full fine-tune of SmolLM2-135M from 2.5 GB in training to 3.5 GB). Every process must call
    it; the file is what ``save_pretrained`` writes (``{"format": "pt"}`` metadata), loadable by transformers."""
    items = _saved_items(model, only_trainable=False)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, value in items:
        nbytes = value.numel() * value.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    handle = open(path, "wb") if is_main else None
    try:
        if handle is not None:
            handle.write(len(blob).to_bytes(8, "little") + blob)
        for _, value in items:
            whole = full_tensor(value.detach())
            if handle is not None:
                flat = whole.cpu().contiguous().reshape(-1)
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
    finally:
        if handle is not None:
            handle.close()


# ------------------------------------------------------------------------------------------------ checkpoints
def _tied(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied output head): saved once, under the first name."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(tensors, rest): the trainable parameters and the optimizer's tensor state keyed for DCP, and the
    optimizer's non-tensor entries (JSON-able)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {_MODEL + k: v for k, v in msd.items() if k in trainable}
    rest = {}
    for k, v in osd.items():
        if isinstance(v, torch.Tensor):
            tensors[_OPTIM + k] = v
        else:
            rest[k] = list(v) if isinstance(v, tuple) else v
    return tensors, rest


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the trainable parameters and of the optimizer state under
    ``path/dcp`` with ``torch.distributed.checkpoint`` and its safetensors storage (HuggingFaceStorageWriter,
    ``shard-0000R-...safetensors`` files for process R; each file's header holds, as JSON, the offsets of its
    pieces in the whole tensors). DCP's default FileSystemWriter pickles its ``.metadata`` file; this storage
    writes none, and the reader rebuilds the metadata from the safetensors headers, so nothing is unpickled on
    load. Files hold at most :data:`DCP_FILE_BYTES` of tensors (``shard-0000R-model-0000F-of-0000N.safetensors``). The non-tensor optimizer entries go to ``dcp_rest.json`` (main process). Collective."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    tensors, rest = _state(model, optimizer)
    writer = HuggingFaceStorageWriter(str(path / DCP_DIRNAME), save_distributed=True, fqn_to_index_mapping=file_groups(tensors))
    dcp.save(tensors, storage_writer=writer)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (path / DCP_REST_FILE).write_text(json.dumps(rest, indent=1))


DCP_FILE_BYTES = 128 * 2**20
"""Most bytes of whole tensors per checkpoint file. The safetensors storage serialises a file in memory before
writing it, so its transient cost is about twice one file: with one file per process, saving the full fine-tune of
SmolLM2-135M on 2 processes raised the peak RSS from 2.9 GB (training) to 4.2 GB; files of at most 128 MB of
(whole) tensors bound the extra to a few hundred MB whatever the model."""


def file_groups(tensors: dict[str, torch.Tensor], limit: int | None = None) -> dict[str, int]:
    """Key -> file index (1..F), in key order, at most ``limit`` bytes of whole tensors a file (default
    :data:`DCP_FILE_BYTES`, or the environment's ``POSTTRAIN_DCP_FILE_BYTES``). Computed from global shapes, so every
    process gets the same mapping (DCP requires it)."""
    if limit is None:
        limit = int(os.environ.get("POSTTRAIN_DCP_FILE_BYTES", DCP_FILE_BYTES))
    groups, index, size = {}, 1, 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()  # a DTensor's numel is the whole tensor's
        if size and size + nbytes > limit:
            index, size = index + 1, 0
        groups[key] = index
        size += nbytes
    return groups


def has_sharded_state(path: Path) -> bool:
    return (Path(path) / DCP_DIRNAME).is_dir()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore :func:`save_sharded`'s state into ``model`` and ``optimizer``, sharded over any number of processes
    (or none: a plain model): DCP reads each process's pieces by their offsets, so a 2-process checkpoint resumes
    on 1 or 4 processes (resharding). Collective when sharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from posttrain.errors import PosttrainError

    tensors, rest = _state(model, optimizer)
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / DCP_DIRNAME)))
    except Exception as error:  # DCP wraps a missing key or shape mismatch in CheckpointException
        raise PosttrainError(f"{path / DCP_DIRNAME} does not fit this run's trainable parameters and optimizer "
                             f"({str(error).strip().splitlines()[-1][:300]}); resume with the same model, method "
                             "and adapter settings as the saved run") from None
    saved_rest = json.loads((path / DCP_REST_FILE).read_text())
    osd = {k[len(_OPTIM):]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    for k, v in saved_rest.items():
        osd[k] = tuple(v) if isinstance(rest.get(k), list) else v
    msd = {k[len(_MODEL):]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                   options=StateDictOptions(flatten_optimizer_state_dict=True, strict=False))
