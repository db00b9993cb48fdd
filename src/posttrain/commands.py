"""Try-it and ship-it commands: generate, chat, merge, eval, score."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from posttrain.config import EvalConfig, GenerateConfig, MergeConfig, SamplingSection, ScoreConfig
from posttrain.data.formats import SFTExample
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.loading import load_tokenizer


def _sampling(s: SamplingSection):
    from posttrain.generation import SamplingConfig

    return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)


def _load(model: str, adapter: str | None, trust_remote_code: bool):
    from posttrain.models.adapters import load_for_inference

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    return load_for_inference(model, adapter, trust_remote_code), tokenizer


def _prompts_from_file(path: str) -> list[list[dict]]:
    """Conversations to answer from a data file: the rows' prompts, without their reference answers."""
    from posttrain.data.formats import normalize_sft
    from posttrain.data.io import read_records
    from posttrain.errors import DataError

    prompts = []
    for rec in read_records(path):
        if rec.error:
            raise DataError(rec.where, rec.error)
        try:
            prompts.append(normalize_sft(rec.data).prompt_messages())
        except ValueError as e:
            raise DataError(rec.where, str(e)) from e
    return prompts


def run_generate(cfg: GenerateConfig) -> list[str]:
    from posttrain.generation import generate

    prompts: list[list[dict]] = [[{"role": "user", "content": p}] for p in cfg.prompt]
    if cfg.prompts_file:
        prompts += _prompts_from_file(cfg.prompts_file)
    if not prompts:
        raise ConfigError("prompt: give at least one prompt (prompt='[\"...\"]') or a prompts_file")
    if cfg.system:
        prompts = [[{"role": "system", "content": cfg.system}] + [m for m in p if m["role"] != "system"] for p in prompts]
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load(cfg.model, cfg.adapter, cfg.trust_remote_code)
    outputs = generate(model, tokenizer, prompts, _sampling(cfg.sampling), batch_size=cfg.batch_size, progress=len(prompts) > cfg.batch_size)
    for conv, out in zip(prompts, outputs):
        print(f">>> {conv[-1]['content']}\n{out}\n")
    return outputs


def run_chat(cfg: GenerateConfig) -> None:
    from posttrain.generation import chat_loop

    torch.manual_seed(cfg.seed)
    model, tokenizer = _load(cfg.model, cfg.adapter, cfg.trust_remote_code)
    chat_loop(model, tokenizer, _sampling(cfg.sampling), system=cfg.system)


def run_merge(cfg: MergeConfig) -> Path:
    from peft import PeftConfig

    if not cfg.adapter or not cfg.output_dir:
        raise ConfigError("merge needs adapter=<adapter dir> and output_dir=<where to write the merged model>")
    kind = PeftConfig.from_pretrained(cfg.adapter).peft_type.value
    if kind != "LORA":
        raise ConfigError(f"adapter: merge needs a LoRA/DoRA adapter; '{cfg.adapter}' is {kind} (it adds tokens, there is nothing to fold into the weights)")
    model, tokenizer = _load(cfg.model, cfg.adapter, cfg.trust_remote_code)
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check that merging keeps the logits: the quick brown fox."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        before = model(**probe).logits
        merged = model.merge_and_unload()
        after = merged(**probe).logits
    diff = float((before - after).abs().max())
    print(f"max |logit difference| adapter vs merged: {diff:.2e}")
    if cfg.check and diff > cfg.atol:
        raise PosttrainError(f"merged logits differ from the adapter model's by {diff:.3e} > atol {cfg.atol}; not saving")
    out = Path(cfg.output_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"merged model saved to {out}")
    return out


def run_eval(cfg: EvalConfig) -> dict:
    from posttrain.data.collate import collate_sft
    from posttrain.data.dataset import load_sft_dataset
    from posttrain.generation import generate
    from posttrain.models.forward import target_logps

    if not cfg.data:
        raise ConfigError("data: required (a dataset to compute loss and perplexity on)")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rows, report = load_sft_dataset(cfg.data, tokenizer, max_length=cfg.max_length, skip_invalid=cfg.skip_invalid, loss_on=cfg.loss_on)
    print(report.summary())
    model, _ = _load(cfg.model, cfg.adapter, cfg.trust_remote_code)
    total, tokens = 0.0, 0
    from tqdm.auto import tqdm

    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), cfg.batch_size), desc="eval", disable=len(rows) <= cfg.batch_size):
            batch = collate_sft(rows[start : start + cfg.batch_size], tokenizer.pad_token_id)
            logps, _ = target_logps(model, batch)
            total -= float(logps.sum())
            tokens += logps.numel()
    loss = total / max(tokens, 1)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "rows": len(rows)}
    print(f"eval loss {loss:.4f}  perplexity {result['perplexity']:.2f}  over {tokens} target tokens in {len(rows)} rows")
    if cfg.num_samples > 0:
        convs = _prompts_from_file(cfg.data)[: cfg.num_samples]
        outs = generate(model, tokenizer, convs, _sampling(cfg.sampling), batch_size=cfg.batch_size)
        for conv, out in zip(convs, outs):
            print(f"\n>>> {conv[-1]['content']}\n{out}")
        result["samples"] = outs
    return result


def _score_rows(path: str) -> tuple[list[SFTExample], list[tuple[int, str]]]:
    """Examples to score from a data file, and for each its (row index, field name)."""
    from posttrain.data.formats import normalize_prompt_completion, normalize_sft
    from posttrain.data.io import read_records
    from posttrain.data.preference import normalize_pair
    from posttrain.errors import DataError

    examples, where = [], []
    for i, rec in enumerate(read_records(path)):
        if rec.error:
            raise DataError(rec.where, rec.error)
        data = rec.data
        try:
            if data.get("chosen") is not None or data.get("rejected") is not None:
                chosen, rejected = normalize_pair(data)
                examples += [chosen, rejected]
                where += [(i, "chosen"), (i, "rejected")]
            elif data.get("response") is not None:
                examples.append(normalize_prompt_completion(data.get("prompt", ""), data["response"], "response"))
                where.append((i, "response"))
            else:
                examples.append(normalize_sft(data))
                where.append((i, "completion"))
        except ValueError as e:
            raise DataError(rec.where, str(e)) from e
    return examples, where


def run_score(cfg: ScoreConfig) -> list[dict]:
    """Print (and optionally write) the reward of each prompt/response."""
    import json

    from posttrain.rewards.model import load_reward_model

    if not cfg.reward_model:
        raise ConfigError("reward_model: required (the output directory of `posttrain rm`)")
    if not cfg.data and not (cfg.prompt is not None and cfg.response):
        raise ConfigError("give data=<file> or prompt=... response=... (response may be a list)")
    if cfg.data:
        examples, where = _score_rows(cfg.data)
    else:
        from posttrain.data.formats import normalize_prompt_completion

        responses = [cfg.response] if isinstance(cfg.response, str) else cfg.response
        try:
            examples = [normalize_prompt_completion(cfg.prompt, r, "response") for r in responses]
        except ValueError as e:
            raise ConfigError(str(e)) from e
        where = [(i, "response") for i in range(len(examples))]
    rm = load_reward_model(cfg.reward_model, cfg.model, cfg.trust_remote_code, cfg.max_length)
    scores = rm.score_examples(examples, cfg.batch_size)
    rows: dict[int, dict] = {}
    for (i, field), ex, s in zip(where, examples, scores):
        rows.setdefault(i, {"row": i + 1})[f"reward_{field}" if field != "completion" else "reward"] = s
        shown = ex.completion if ex.kind == "prompt_completion" else ex.messages[-1]["content"]
        print(f"{s:+.4f}  row {i + 1} {field}: {shown[:100]!r}")
    out = list(rows.values())
    for r in out:
        if "reward_chosen" in r and "reward_rejected" in r:
            r["chosen_preferred"] = r["reward_chosen"] > r["reward_rejected"]
    pairs = [r for r in out if "chosen_preferred" in r]
    if pairs:
        acc = sum(r["chosen_preferred"] for r in pairs) / len(pairs)
        print(f"pairwise accuracy: {acc:.1%} of {len(pairs)} pairs rank chosen above rejected")
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r) + "\n" for r in out))
        print(f"scores written to {cfg.output}")
    return out
