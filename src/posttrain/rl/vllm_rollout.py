"""The vLLM rollout engine (``rollout.engine=vllm``): the :class:`~posttrain.rl.rollout.RolloutSampler` interface
on a vLLM engine, colocated in the training process or a separate server (:mod:`posttrain.vllm_backend`).

**Weight sync.** Before the first rollout of every step (:meth:`VLLMRolloutSampler.sync`, called by the RL
objective with the step number), vLLM is given the trainer's current weights:

- LoRA / QLoRA, ``rollout.vllm.lora_sync=adapter`` (the default on CUDA): the adapter's tensors are written as a
  PEFT adapter folder (``sync_dir/v<N>``, only the trainable tensors, a few MB) and loaded into vLLM under a new
  LoRA id; the base weights never move and nothing is merged. QLoRA's base in vLLM is the unquantised model: the
  log-prob gap this leaves is measured and corrected for below.
- LoRA / QLoRA, ``lora_sync=merged`` (the default on a CPU, where vLLM's LoRA path is 6x slower than its plain one):
  ``base + scale * B A`` is computed per layer (the trainer's model is not touched; QLoRA's base dequantised, so
  vLLM samples from the trainer's own 4-bit base) and pushed as full weights, as for full fine-tuning.
- Full fine-tuning: every weight is pushed. Colocated, vLLM's ``reload_weights`` reads the trainer's tensors
  directly (copied into vLLM's own layout, no file); in server mode they are written as one safetensors file that
  the server reloads.

The time each sync takes is logged (``rollout/sync_seconds``).

**Log-probs.** vLLM returns, for each sampled token, its log-prob under the distribution it sampled from
(``logprobs_mode=processed_logprobs``: after temperature, top-k and top-p, renormalised over what top-k/top-p
keep). That is the behaviour policy q of the importance-sampling correction (``rollout.correction``, see
:func:`posttrain.losses.rollout_is_weights`). Without top-k/top-p it is the temperature-scaled policy itself, as the
built-in engine's ``logprobs``; with them, the KL metric uses these truncated log-probs too. The per-token
"entropy" logged for vLLM rollouts is -log q(token), the one-sample Monte-Carlo estimate of the sampling
distribution's entropy (unbiased; vLLM does not return the full distribution).

**Seeds.** Each prompt is one vLLM request with ``n`` samples and the prompt's seed (the RL objective's per-prompt
seeds), so the same seeds and the same weights give the same rollouts, and a resumed run samples what an
uninterrupted one does. vLLM draws differently from the built-in engine: same distribution, other samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from posttrain.errors import ConfigError
from posttrain.rl.rollout import Completion, RolloutStats, Sampling, _causal_lm
from posttrain.vllm_backend import (
    ColocatedEngine,
    Request,
    ServerEngine,
    VLLMSection,
    check_adapter,
    engine_kwargs,
    prune_sync_dirs,
    resolve_dtype,
    save_full_weights,
)


def checkpoint_names(model_path: str) -> set[str]:
    """The tensor names in a model folder's safetensors files (read from their headers), or an empty set."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            names.update(handle.keys())
    return names


def resolve_lora_sync(mode: str) -> str:
    if mode != "auto":
        return mode
    return "adapter" if torch.cuda.is_available() else "merged"


@torch.no_grad()
def merged_weights(peft_model):
    """(Hugging Face name, tensor) of every weight of ``base + scale * B A``, without touching the model: each LoRA
    layer's base weight (dequantised for QLoRA, so vLLM samples from the trainer's own 4-bit base) plus its delta,
    and every other parameter as it is."""
    from peft.tuners.lora import LoraLayer

    from posttrain.models.fused_lora import dense_weight

    base = peft_model.get_base_model()
    lora_prefixes: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in lora_prefixes):
            continue  # lora_A/lora_B/base_layer inside a LoRA layer
        if isinstance(module, LoraLayer):
            lora_prefixes.append(name + ".")
            inner = module.get_base_layer()
            weight = dense_weight(inner.weight, torch.float32).detach()
            if "default" in module.lora_A:
                weight = weight + module.get_delta_weight("default").float()
            yield f"{name}.weight", weight
            if getattr(inner, "bias", None) is not None:
                yield f"{name}.bias", inner.bias.detach()
            continue
        for pname, param in module.named_parameters(recurse=False):
            yield (f"{name}.{pname}" if name else pname), param.detach()


class VLLMRolloutSampler:
    """``generate(model, prompt_ids, n, sampling, seeds=...)`` on vLLM, after :meth:`sync` gave it the weights."""

    engine_name = "vllm"

    def __init__(self, tokenizer, *, model_path: str, section: VLLMSection, method: str, lora_rank: int,
                 mixed_precision: str, max_model_len: int, seed: int, sync_dir: str, eos_token_ids: list[int],
                 trust_remote_code: bool = False, log_dir: str | None = None):
        self.tokenizer = tokenizer
        self.section = section
        self.lora = method in ("lora", "qlora")
        self.lora_sync = resolve_lora_sync(section.lora_sync) if self.lora else "full"
        self.eos_ids = sorted({int(e) for e in eos_token_ids if e is not None})
        self.sync_root = Path(sync_dir)
        self.checkpoint_names = checkpoint_names(model_path)
        self.stats = RolloutStats()
        self.sync_seconds = 0.0  # of the last sync
        self.syncs = 0
        self._synced_step: int | None = None
        self._version = 0
        kw = engine_kwargs(model_path, section, dtype=resolve_dtype(section.dtype, mixed_precision),
                           max_model_len=max_model_len, seed=seed,
                           lora_rank=lora_rank if self.lora_sync == "adapter" else None,
                           trust_remote_code=trust_remote_code)
        t0 = time.perf_counter()
        if section.mode == "colocate":
            self.engine = ColocatedEngine(**kw)
        else:
            log = str(Path(log_dir) / "vllm-server.log") if log_dir else None
            if log:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.engine = ServerEngine(section.server_url, engine=kw, timeout_s=section.server_timeout_s, log_path=log)
        self.start_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ weights
    def assume_synced(self) -> None:
        """vLLM already holds the model's weights (it loaded them from ``model_path`` and nothing changed them):
        generate without a first sync."""
        self.syncs = max(self.syncs, 1)

    def sync(self, model: torch.nn.Module, step: int | None) -> None:
        """Give vLLM the trainer's weights, once per ``step`` (None: always)."""
        if step is not None and step == self._synced_step:
            return
        t0 = time.perf_counter()
        inner = _causal_lm(model)
        self._version += 1
        if self.lora_sync == "adapter":
            self._sync_lora(inner)
        elif self.lora_sync == "merged":
            check_adapter(getattr(inner, "peft_config", {}).get("default"))
            self._push(merged_weights(inner))
        else:
            self._push((name, p.detach()) for name, p in inner.named_parameters())
        self._synced_step = step
        self.sync_seconds = time.perf_counter() - t0
        self.syncs += 1

    def _sync_lora(self, peft_model) -> None:
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        config = getattr(peft_model, "peft_config", {}).get("default")
        if config is None:
            raise ConfigError("rollout.engine=vllm: method lora/qlora but the model has no 'default' LoRA adapter")
        check_adapter(config)
        folder = self.sync_root / f"v{self._version}"
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(peft_model, adapter_name="default")
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(folder))
        self.engine.use_lora(f"policy-v{self._version}", self._version, str(folder))
        prune_sync_dirs(self.sync_root, keep=2)

    def _push(self, named) -> None:
        """Every weight of the model, in Hugging Face names (vLLM reloads fused modules whole); what the model's
        checkpoint does not hold (PPO's value head) stays out."""
        if self.checkpoint_names:
            named = ((n, t) for n, t in named if n in self.checkpoint_names)
        if isinstance(self.engine, ColocatedEngine):
            self.engine.load_weights(named)
        else:
            folder = self.sync_root / f"v{self._version}"
            save_full_weights(named, folder)
            self.engine.load_weights_from(str(folder))
            prune_sync_dirs(self.sync_root, keep=2)

    # ------------------------------------------------------------------------------------------ sampling
    def generate(self, model: torch.nn.Module, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                 generator: torch.Generator | None = None, seeds: list[int] | None = None) -> list[Completion]:
        """Same contract as the built-in engine's ``generate``: ``n`` completions per prompt, grouped in the caller's
        order. The weights are the last :meth:`sync`'s; ``model`` is only checked."""
        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        _causal_lm(model)
        if self._synced_step is None and self.syncs == 0:
            self.sync(model, None)
        if seeds is None and generator is not None:
            seeds = torch.randint(0, 2**62, (len(prompt_ids),), generator=generator).tolist()
        requests = [Request(prompt_ids=list(p), n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, top_k=sampling.top_k, stop=[s for s in sampling.stop if s],
                            stop_token_ids=self.eos_ids, seed=None if seeds is None else int(seeds[i]) % (2**63))
                    for i, p in enumerate(prompt_ids)]
        t0 = time.perf_counter()
        results = self.engine.generate(requests)
        out: list[Completion] = []
        for i, samples in enumerate(results):
            if len(samples) != n:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {n}")
            for s in samples:
                out.append(Completion(i, s.token_ids, s.logprobs, [-lp for lp in s.logprobs], s.text.strip(),
                                      s.finish_reason, sample_logprobs=list(s.logprobs)))
        self.stats.seconds += time.perf_counter() - t0
        self.stats.tokens += sum(len(c.token_ids) for c in out)
        return out

    def close(self) -> None:
        """Stop the engine (a server posttrain started) and delete the sync folders."""
        import shutil

        if self.engine is not None:
            self.engine.close()
            self.engine = None
        shutil.rmtree(self.sync_root, ignore_errors=True)
