"""Load a reward model trained by ``posttrain rm`` and score prompt/response pairs with it.

A reward model directory is one of two standard artefacts:

- full fine-tuning: a transformers model directory; ``AutoModelForSequenceClassification.from_pretrained(dir)``
  loads it.
- an adapter method: a PEFT ``SEQ_CLS`` adapter (its trained ``score`` head included). Plain PEFT loads it:
  ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), dir)``
  with ``base`` the adapter's ``base_model_name_or_path`` (or the model the run used) and the base config's
  ``pad_token_id`` set to the tokenizer's, which :func:`load_reward_model` does.

Scores are read where transformers reads them (the last token that is not padding), and responses are
rendered exactly as in training (the chat template for message lists; prompt + response + EOS for strings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.data.formats import SFTExample, normalize_prompt_completion
from posttrain.data.tokenize import TokenizedExample, tokenize_sft
from posttrain.errors import ConfigError


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    max_length: int = 1024

    @torch.no_grad()
    def score_examples(self, examples: list[SFTExample], batch_size: int = 16) -> list[float]:
        """Rewards of already-validated prompt+response examples, in order."""
        from posttrain.data.preference import collate_sequences
        from posttrain.models.forward import sequence_scores

        seqs = []
        for ex in examples:
            tok = tokenize_sft(ex, self.tokenizer)
            seqs.append(TokenizedExample(tok.input_ids[: self.max_length], tok.loss_mask[: self.max_length]))
        out: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(seqs), batch_size):
            batch = collate_sequences(seqs[start : start + batch_size], self.tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            out.extend(sequence_scores(self.model, batch).tolist())
        return out

    def score(self, prompt: str | list[dict], responses: list[str | list[dict]], batch_size: int = 16) -> list[float]:
        """Rewards of ``responses`` to one ``prompt`` (a string, or a message list with message-list responses)."""
        return self.score_examples([normalize_prompt_completion(prompt, r, "response") for r in responses], batch_size)


def load_reward_model(path: str | Path, base: str | None = None, trust_remote_code: bool = False,
                      max_length: int = 1024) -> RewardModel:
    """The reward model in ``path`` (full model or adapter directory), in eval mode, fp32."""
    from peft import PeftModel

    from posttrain.models.loading import load_causal_lm, load_tokenizer

    path = Path(path)
    adapter_cfg = path / "adapter_config.json"
    if adapter_cfg.is_file():
        base = base or json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"reward_model: {path} is an adapter without base_model_name_or_path; pass model=<base>")
        tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)
        model = load_causal_lm(base, trust_remote_code=trust_remote_code, task="seq_cls")
        model.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(model, str(path))
    elif (path / "config.json").is_file():
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        model = load_causal_lm(str(path), trust_remote_code=trust_remote_code, task="seq_cls")
        if model.config.num_labels != 1:
            raise ConfigError(f"reward_model: {path} has {model.config.num_labels} labels; a reward model has 1")
    else:
        raise ConfigError(f"reward_model: '{path}' is neither a model directory (config.json) nor an adapter (adapter_config.json)")
    model.eval()
    return RewardModel(model, tokenizer, max_length)
