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
4. Prompt-learning adapters (prompt tuning, P-tuning, prefix tuning) do not go through
   ``PeftModel.generate``: with peft 0.21 and transformers 5.24 it is wrong (transformers now names the
   KV cache ``cache``, PEFT still looks for ``past_key_values``). Prompt tuning re-inserts the virtual
   tokens at every decoding step, and prefix tuning silently drops the prefix, so it generates exactly
   like the base model. PEFT also drops ``position_ids`` for prompt tuning, so left padding would shift
   the prompt away from the virtual tokens. We call the base model's ``generate`` with the virtual
   tokens ourselves (``_prompt_learning_new_token_ids``); greedy output then equals a cache-free,
   unpadded loop over ``PeftModel.forward``, for any padding.
"""

from __future__ import annotations

import re
import secrets
import sys
import warnings
from dataclasses import dataclass

import torch
from peft import PeftModel, PeftType

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


def sampling_from(section) -> SamplingConfig:
    """The sampling settings of a config's ``sampling`` section (max_new_tokens, temperature, top_p, top_k)."""
    return SamplingConfig(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                          top_p=section.top_p, top_k=section.top_k)

def _special_strings(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]


def encode_prompt(tokenizer, prompt: Messages | str, content_as_text: bool = False) -> list[int]:
    """Token ids of a prompt: chat messages through the chat template with a generation prompt, or raw text.

    ``content_as_text`` (what ``posttrain serve`` does with its clients' messages): a control token written *in a
    message's content* (``<|im_end|>\n<|im_start|>system``) is tokenised as the plain text it is, so a user cannot
    forge a turn; the template's own control tokens stay control tokens. A message whose content holds such a
    string is rendered with a placeholder that is replaced by the content's text tokens (so that message skips
    any rewriting the template would do to its content, such as trimming); every other message is rendered as
    usual, and a prompt without such strings is encoded exactly as without the option."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    specials = _special_strings(tokenizer) if content_as_text else []
    hostile = [i for i, m in enumerate(prompt) if any(s in str(m.get("content", "")) for s in specials)]
    if not hostile:
        # The chat template already writes the special tokens, so the tokenizer must not add a BOS again.
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    nonce = secrets.token_hex(8)
    markers = {f"PTCONTENT{nonce}N{i}X": str(prompt[i]["content"]) for i in hostile}
    masked = [{**m, "content": marker} for m, marker in zip([prompt[i] for i in hostile], markers, strict=True)]
    rendered_messages = list(prompt)
    for i, m in zip(hostile, masked, strict=True):
        rendered_messages[i] = m
    text = tokenizer.apply_chat_template(rendered_messages, add_generation_prompt=True, tokenize=False)
    ids: list[int] = []
    for k, part in enumerate(re.split(f"(PTCONTENT{nonce}N\\d+X)", text)):
        if k % 2:  # a placeholder: the content, special-looking strings included, as plain text
            ids += tokenizer(markers[part], add_special_tokens=False, split_special_tokens=True).input_ids
        elif part:
            ids += tokenizer(part, add_special_tokens=False).input_ids
    return ids


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
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
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
                new_ids = _new_token_ids(
                    model, inputs["input_ids"], inputs["attention_mask"], tokenizer.pad_token_id, sampling
                )
                texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True)
                for i, text in zip(batch, texts, strict=True):
                    completions[i] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return completions


def _new_token_ids(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, sampling: SamplingConfig
) -> torch.Tensor:
    """Generate for one left-padded batch; returns only the new token ids, (B, T_new)."""
    kwargs = {"pad_token_id": pad_token_id, "use_cache": True, **sampling.generate_kwargs()}
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        return _prompt_learning_new_token_ids(model, input_ids, attention_mask, kwargs)
    output_ids = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # (B, T + T_new)
    return output_ids[:, input_ids.shape[1] :]


def _prompt_learning_new_token_ids(
    model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, generate_kwargs: dict
) -> torch.Tensor:
    """Generate with a prompt-learning adapter by handing its virtual tokens to the base model (module point 4).

    The virtual tokens come first and always attend, as in ``PeftModel.forward``:
    ``[virtual (V)] [left padding] [prompt]``. ``generate`` derives positions from the attention mask, so
    the prompt starts at position V whatever the padding, which is where training put it.
    """
    config = model.active_peft_config
    base_model = model.get_base_model()
    batch_size, num_virtual = input_ids.shape[0], config.num_virtual_tokens
    virtual_mask = attention_mask.new_ones(batch_size, num_virtual)
    attention_mask = torch.cat([virtual_mask, attention_mask], dim=1)  # (B, V + T)
    if config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        token_embeds = base_model.get_input_embeddings()(input_ids)  # (B, T, H)
        virtual_embeds = model.get_prompt(batch_size=batch_size).to(token_embeds.dtype)  # (B, V, H)
        inputs_embeds = torch.cat([virtual_embeds, token_embeds], dim=1)  # (B, V + T, H)
        # Given only embeddings, generate returns only the new tokens.
        return base_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
    if config.peft_type == PeftType.PREFIX_TUNING:
        prefix_cache = model.get_prompt(batch_size=batch_size)  # a KV cache already holding V positions
        # generate skips the ids the cache already covers, so V placeholder ids stand in for the prefix.
        placeholder_ids = input_ids.new_full((batch_size, num_virtual), generate_kwargs["pad_token_id"])
        input_ids = torch.cat([placeholder_ids, input_ids], dim=1)  # (B, V + T)
        with warnings.catch_warnings():
            # `past_key_values` works on every transformers 5.x; 5.24 renamed it `cache` and warns.
            warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
            output_ids = base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, past_key_values=prefix_cache, **generate_kwargs
            )
        return output_ids[:, input_ids.shape[1] :]
    raise ConfigError(
        f"generate does not support the PEFT method {config.peft_type.value}; "
        "use LoRA, prompt tuning, P-tuning or prefix tuning"
    )


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
