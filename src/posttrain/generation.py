"""Batched text generation for evaluation and sampling, plus a tiny interactive chat loop.

``generate`` is the one way posttrain turns prompts into completions (evaluation, demos, RL rollouts
on small models). It works for a plain transformers causal LM and for a ``peft.PeftModel`` (LoRA as
well as prompt-tuning / prefix-tuning adapters), because it only calls ``model.generate``.

How it batches:
1. Prompts are tokenized one by one, sorted by length and cut into batches, so each batch pads little.
   Completions come back in the caller's order.
2. Padding is on the LEFT, so every row's last prompt token sits at the same position and new tokens
   are appended right after it. The tokenizer's ``padding_side`` is restored afterwards.
3. Greedy decoding (``temperature == 0``) is deterministic; a row's completion does not depend on the
   batch it lands in beyond float rounding of padded attention.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from posttrain.errors import ConfigError

Messages = list[dict]


@dataclass
class SamplingConfig:
    """How to decode new tokens."""

    max_new_tokens: int = 128
    """Most tokens generated per prompt; generation stops earlier at the end-of-sequence token."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy decoding (deterministic)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches ``top_p`` (1 = off)."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 = off)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``."""
        if self.temperature == 0:
            # Override sampling fields a checkpoint's generation_config may set, so greedy stays greedy.
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False,
                    "temperature": None, "top_p": None, "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k or None}


def _prompt_ids(tokenizer, prompt: Messages | str) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    # The chat template already writes the special tokens, so the tokenizer must not add a BOS again.
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def generate(
    model,
    tokenizer,
    prompts: list[Messages] | list[str],
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Complete each prompt; returns only the new text (special tokens skipped, stripped), in input order.

    A prompt is either a list of chat messages (rendered with the chat template and a generation
    prompt) or a raw string (tokenized as is). The model is put in eval mode for the call and its
    previous train/eval mode is restored afterwards.
    """
    sampling = sampling or SamplingConfig()
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to the EOS token)")
    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")

    completions: list[str] = [""] * len(encoded)
    was_training, padding_side = model.training, tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
                inputs = inputs.to(model.device)
                output_ids = model.generate(
                    **inputs, pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling.generate_kwargs()
                )  # (B, T_prompt + T_new): generate returns the prompt ids, never PEFT's virtual tokens
                new_ids = output_ids[:, inputs["input_ids"].shape[1] :]
                texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
                for i, text in zip(batch, texts, strict=True):
                    completions[i] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def chat_loop(model, tokenizer, sampling: SamplingConfig | None = None, system: str | None = None) -> None:
    """Chat with the model on stdin/stdout, keeping the conversation; ``/reset`` clears it, ``/exit`` or EOF quits."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print("chat: /reset clears the conversation, /exit quits", flush=True)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], sampling, batch_size=1)[0]
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)
