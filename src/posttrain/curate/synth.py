"""``posttrain data synth sft|preference``: synthesise training data with a teacher model.

**Teacher**: any OpenAI-compatible endpoint (``teacher.base_url``: OpenAI, vLLM, Ollama, ``posttrain serve``;
requests run ``teacher.concurrency`` at a time, at most ``teacher.rate_limit`` per second, retried with
backoff: :mod:`posttrain.openai_compat`), or, without ``base_url``, a local transformers model
(``teacher.model``: the embedded ``smollm2-135m``, a directory, a hub id; optional ``teacher.adapter``),
sampled by the RL rollout engine (one prefill per prompt shared by its samples).

**sft** (self-instruct, after Wang et al. 2023, "Self-Instruct: Aligning Language Models with Self-Generated
Instructions", ACL): seed tasks (any SFT file: ``messages``, ``prompt``/``completion``) form a pool; each
proposal shows the teacher ``examples_per_prompt`` instructions drawn from the pool and asks for a new one. A
proposal is kept only if its ROUGE-L F1 with every instruction in the pool is below ``max_similarity`` (0.7,
the paper's threshold) and it has 3-150 words; kept instructions join the pool, and the teacher answers each.

**preference**: for each prompt (``prompt`` or ``messages`` rows, as for GRPO; the other columns reach the
rewards), the teacher samples ``num_samples`` responses; the ``rewards`` list (verifiers, reward functions run in
a subprocess, ``posttrain rm`` reward models or an LLM judge, exactly as in GRPO's config) scores them; the best
becomes ``chosen`` and the worst ``rejected``. A prompt whose best and worst scores differ by no more than
``min_margin``, or whose samples are all the same text, gives no pair and is counted.

**Resumable**: every finished item is appended to ``OUTPUT.partial.jsonl`` and flushed at once, so a crash or
Ctrl-C loses no finished row; rerunning the same command continues where it stopped (batches start at the same items, with the same seeds).

**Final pass**: the generated rows go through the same filters as ``posttrain data clean`` (the ``clean:``
section: dedup, boilerplate, PII, broken code, invalid JSON, ...) into ``OUTPUT``, with every dropped row and
its reason in ``OUTPUT.rejects.jsonl``; generated rows are also in ``OUTPUT.raw.jsonl``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from posttrain.config import build_config, opt, section
from posttrain.curate.clean import CleanConfig
from posttrain.data.prompts import prompt_rows
from posttrain.errors import ConfigError, DataError

SELF_INSTRUCT_MAX_SIMILARITY = 0.7  # Wang et al. 2023, section 2.3
DEFAULT_INSTRUCTION_TEMPLATE = """Here are some example tasks a user gave an AI assistant:

{examples}

Write one new task for the assistant. It must be different from the examples in topic and wording, \
self-contained and answerable in text. Reply with the task only."""


# --------------------------------------------------------------------------------------------- config
@dataclass
class TeacherSection:
    model: str = opt("smollm2-135m", "The teacher: a local model ('smollm2-135m', a directory, a hub id), or the served model's name when base_url is set.")
    base_url: str | None = opt(None, "An OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (null: run `model` locally).")
    adapter: str | None = opt(None, "Local teacher only: a PEFT adapter directory to apply.")
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the endpoint's API key (never logged).")
    concurrency: int = opt(8, "Endpoint requests in flight at once.")
    rate_limit: float = opt(0.0, "Endpoint requests per second at most, retries included (0: no limit).")
    retries: int = opt(3, "Retries of a timed-out, 429 or 5xx request (exponential backoff).")
    timeout: float = opt(120.0, "Seconds per endpoint request.")
    batch_size: int = opt(8, "Local teacher: prompts generated together.")
    engine: Literal["builtin", "vllm"] = opt("builtin", "Local teacher: what generates: builtin = posttrain's own decoding loop; vllm = a vLLM engine in this process (`make vllm`; an adapter is merged into vLLM's copy of the weights).")
    trust_remote_code: bool = opt(False, "Local teacher: allow the model repository to run its own code.")


@dataclass
class SynthSampling:
    max_new_tokens: int = opt(256, "Tokens per response at most.")
    temperature: float = opt(0.8, "Sampling temperature (preference data needs > 0 for different samples).")
    top_p: float = opt(0.95, "Nucleus sampling threshold.")


@dataclass
class SynthConfig:
    output: str | None = opt(None, "Final JSONL file (required); OUTPUT.partial.jsonl, .raw.jsonl and .rejects.jsonl go beside it.")
    seeds: str | None = opt(None, "sft: seed tasks (messages or prompt/completion rows) (required for sft).")
    prompts: str | None = opt(None, "preference: prompts (prompt or messages rows; other columns reach the rewards) (required for preference).")
    num_rows: int = opt(100, "sft: new rows to generate.")
    examples_per_prompt: int = opt(3, "sft: pool instructions shown in each proposal request.")
    max_similarity: float = opt(SELF_INSTRUCT_MAX_SIMILARITY, "sft: a proposal is kept only if its ROUGE-L F1 with every pool instruction is below this.")
    max_attempts: int = opt(0, "sft: proposals at most before giving up (0: 20 x num_rows).")
    instruction_template: str = opt(DEFAULT_INSTRUCTION_TEMPLATE, "sft: the proposal request; {examples} is replaced by the numbered examples.")
    num_samples: int = opt(4, "preference: responses sampled per prompt.")
    min_margin: float = opt(0.0, "preference: the best score must exceed the worst by more than this, or the prompt gives no pair.")
    rewards: list[dict] = opt([], "preference: reward sources, as in GRPO's `rewards:` (function / reward_model / judge items).")
    system: str | None = opt(None, "A system message for every teacher request.")
    seed: int = opt(0, "Seed of proposal examples and local sampling (per item, so a resumed run repeats it).")
    teacher: TeacherSection = section(TeacherSection, "The teacher model.")
    sampling: SynthSampling = section(SynthSampling, "Teacher sampling.")
    clean: CleanConfig = section(CleanConfig, "Filters of the final pass (as `posttrain data clean --config`).")

    def validate(self, mode: str) -> None:
        if not self.output:
            raise ConfigError("output: required (the final JSONL file)")
        needed = "seeds" if mode == "sft" else "prompts"
        path = getattr(self, needed)
        if not path:
            raise ConfigError(f"{needed}: required for `synth {mode}`")
        if not Path(path).exists():
            raise ConfigError(f"{needed}: {path}: no such file")
        if mode == "preference":
            if not self.rewards:
                raise ConfigError("rewards: required for `synth preference` (e.g. rewards='[{function: numeric_match}]')")
            if self.num_samples < 2:
                raise ConfigError(f"num_samples: need >= 2 samples to form a pair, got {self.num_samples}")
        if self.num_rows < 1 or self.examples_per_prompt < 1:
            raise ConfigError("num_rows and examples_per_prompt: must be >= 1")
        if not 0 < self.max_similarity <= 1:
            raise ConfigError(f"max_similarity: must be in (0, 1], got {self.max_similarity}")
        if "{examples}" not in self.instruction_template:
            raise ConfigError("instruction_template: has no {examples} placeholder")
        if self.teacher.concurrency < 1 or self.teacher.batch_size < 1:
            raise ConfigError("teacher.concurrency and teacher.batch_size: must be >= 1")


def load_synth_config(path: str | None, overrides: list[str], mode: str) -> SynthConfig:
    cfg = build_config(SynthConfig, path, overrides, "synth options")
    cfg.validate(mode)
    return cfg


# --------------------------------------------------------------------------------------------- similarity
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F1 of two texts over lowercased words (Lin 2004): LCS / len, harmonic mean of both directions."""
    x = _words(a) if isinstance(a, str) else a
    y = _words(b) if isinstance(b, str) else b
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(y), lcs / len(x)
    return 2 * p * r / (p + r)


def clean_instruction(reply: str) -> str:
    """The task in a teacher's proposal: first paragraph, without a "Task:"/"1." label or wrapping quotes."""
    text = reply.strip()
    text = re.sub(r"^(new task|task|instruction)\s*\d*\s*[:.\-]\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"^\d+\s*[.)]\s*", "", text)
    text = text.split("\n\n")[0].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


# --------------------------------------------------------------------------------------------- teachers
class Teacher(Protocol):
    def complete(self, conversations: list[list[dict]], n: int, seeds: list[int]) -> list[list[str | None]]:
        """``n`` replies per conversation (None where a request failed); ``seeds`` one per conversation."""


class EndpointTeacher:
    def __init__(self, t: TeacherSection, sampling: SynthSampling):
        from posttrain.openai_compat import ChatClient

        self.client = ChatClient(t.base_url, t.model, api_key_env=t.api_key_env, timeout=t.timeout, retries=t.retries,
                                 concurrency=t.concurrency, rate_limit=t.rate_limit, what="teacher")
        self.params = {"temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens}
        self.errors: Counter = Counter()

    def complete(self, conversations, n, seeds):
        flat = [c for c in conversations for _ in range(n)]
        replies = []
        for reply, error in self.client.map(flat, **self.params):
            if error is not None:
                self.errors[error.split(":")[0]] += 1
            replies.append(reply)
        return [replies[i * n : (i + 1) * n] for i in range(len(conversations))]

    def close(self):
        self.client.close()


class LocalTeacher:
    def __init__(self, t: TeacherSection, sampling: SynthSampling):
        from posttrain.models.adapters import load_model_and_tokenizer
        from posttrain.models.loading import eos_token_ids
        from posttrain.rl.rollout import RolloutSampler, Sampling

        self.model, self.tokenizer = load_model_and_tokenizer(t.model, t.adapter, t.trust_remote_code)
        eos = eos_token_ids(self.tokenizer, self.model)
        if t.engine == "vllm":
            self.sampler = _vllm_teacher(t, self.tokenizer, self.model, eos, sampling)
        else:
            self.sampler = RolloutSampler(self.tokenizer, prompts_per_batch=t.batch_size, eos_token_ids=eos)
        self.sampling = Sampling(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
        self.errors: Counter = Counter()

    def complete(self, conversations, n, seeds):
        import torch

        from posttrain.data.prompts import prompt_token_ids

        # One batched call seeded by its first item: the drivers cut batches at the same items on a resumed run.
        gen = torch.Generator().manual_seed(seeds[0] if seeds else 0)
        ids = [prompt_token_ids(self.tokenizer, conv) for conv in conversations]
        texts = [c.text for c in self.sampler.generate(self.model, ids, n, self.sampling, gen)]
        return [texts[i * n : (i + 1) * n] for i in range(len(conversations))]

    def close(self):
        self.sampler.close()


def _vllm_teacher(t: TeacherSection, tokenizer, model, eos: list[int], sampling: SynthSampling):
    """The vLLM engine as a local teacher: the model's weights (with its adapter merged, never in the model itself)
    pushed once."""
    import tempfile

    from posttrain.models.loading import resolve_model
    from posttrain.rl.vllm_rollout import VLLMRolloutSampler
    from posttrain.vllm_backend import VLLMSection

    sampler = VLLMRolloutSampler(
        tokenizer, model_path=resolve_model(t.model), section=VLLMSection(lora_sync="merged"),
        method="lora" if t.adapter else "full", lora_rank=16, mixed_precision="no",
        max_model_len=min(getattr(model.config, "max_position_embeddings", 4096) or 4096, 4096), seed=0,
        sync_dir=tempfile.mkdtemp(prefix="posttrain-teacher-"), eos_token_ids=eos,
        trust_remote_code=t.trust_remote_code)
    if t.adapter:
        sampler.sync(model, 0)  # vLLM loaded the base: only an adapter changes the weights
    else:
        sampler.assume_synced()
    return sampler


def make_teacher(cfg: SynthConfig) -> Teacher:
    return EndpointTeacher(cfg.teacher, cfg.sampling) if cfg.teacher.base_url else LocalTeacher(cfg.teacher, cfg.sampling)


# --------------------------------------------------------------------------------------------- the journal
class Journal:
    """``OUTPUT.partial.jsonl``: one line per finished item, ``{"id", "row"}`` or ``{"id", "skip": reason}``,
    flushed as written. Reading it back gives the rows and skips of an interrupted run."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[int, dict] = {}
        self.skips: dict[int, str] = {}
        if path.exists():
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    try:
                        entry = json.loads(line)
                        item = int(entry["id"])
                    except (ValueError, KeyError, TypeError):
                        if line.endswith("\n"):
                            raise DataError(f"{path}:{number}", "not a synth journal line; delete the file to start over") from None
                        break  # a line cut by a crash mid-write: that item is simply redone
                    if "row" in entry:
                        self.rows[item] = entry["row"]
                    else:
                        self.skips[item] = entry.get("skip", "skipped")
        self._f = path.open("a", encoding="utf-8")

    @property
    def done(self) -> set[int]:
        return set(self.rows) | set(self.skips)

    def add_row(self, item: int, row: dict) -> None:
        self.rows[item] = row
        self._write({"id": item, "row": row})

    def add_skip(self, item: int, reason: str) -> None:
        self.skips[item] = reason
        self._write({"id": item, "skip": reason})

    def _write(self, entry: dict) -> None:
        self._f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------------------------- sft
def _seed_instructions(path: str) -> list[str]:
    from posttrain.curate.diversity import instruction_text
    from posttrain.data.formats import normalize_sft
    from posttrain.data.io import read_records

    out = []
    for rec in read_records(path):
        if rec.error:
            raise DataError(rec.where, rec.error)
        try:
            text = instruction_text(normalize_sft(rec.data)).strip()
        except ValueError as e:
            raise DataError(rec.where, str(e)) from None
        if text:
            out.append(text)
    if not out:
        raise DataError(path, "no seed instruction found (expected messages or prompt/completion rows)")
    return out


def _with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def synth_sft(cfg: SynthConfig, teacher: Teacher, journal: Journal, progress: bool = True) -> None:
    from tqdm.auto import tqdm

    pool = _seed_instructions(cfg.seeds)
    pool_words = [_words(t) for t in pool]
    for item in sorted(journal.rows):
        instruction = journal.rows[item]["messages"][0 if not cfg.system else 1]["content"]
        pool.append(instruction)
        pool_words.append(_words(instruction))
    max_attempts = cfg.max_attempts or 20 * cfg.num_rows
    item = max(journal.done, default=-1) + 1
    batch = cfg.teacher.concurrency if cfg.teacher.base_url else cfg.teacher.batch_size
    bar = tqdm(total=cfg.num_rows, initial=len(journal.rows), desc="synth sft rows", unit="row", disable=not progress)
    while len(journal.rows) < cfg.num_rows and item < max_attempts:
        needed = cfg.num_rows - len(journal.rows)
        ids = list(range(item, min(item + min(batch, needed), max_attempts)))
        item = ids[-1] + 1
        requests = []
        for i in ids:
            rng = random.Random(cfg.seed * 1_000_003 + i)
            shown = rng.sample(pool, min(cfg.examples_per_prompt, len(pool)))
            examples = "\n".join(f"{k + 1}. {t}" for k, t in enumerate(shown))
            requests.append(_with_system(cfg.system, [{"role": "user", "content": cfg.instruction_template.replace("{examples}", examples)}]))
        proposals = teacher.complete(requests, 1, [cfg.seed * 1_000_003 + i for i in ids])
        accepted: list[tuple[int, str]] = []
        for i, (reply,) in zip(ids, proposals):
            if reply is None:
                journal.add_skip(i, "teacher request failed")
                continue
            instruction = clean_instruction(reply)
            words = _words(instruction)
            if not 3 <= len(words) <= 150:
                journal.add_skip(i, "proposal not 3-150 words")
                continue
            closest = max((rouge_l(words, w) for w in pool_words), default=0.0)
            if closest >= cfg.max_similarity:
                journal.add_skip(i, f"proposal ROUGE-L >= {cfg.max_similarity} with the pool")
                continue
            pool.append(instruction)
            pool_words.append(words)
            accepted.append((i, instruction))
        for i, _ in accepted[needed:]:
            journal.add_skip(i, "num_rows reached")  # kept in the pool, not answered
        accepted = accepted[:needed]
        if not accepted:
            continue
        answers = teacher.complete([_with_system(cfg.system, [{"role": "user", "content": t}]) for _, t in accepted], 1,
                                   [cfg.seed * 1_000_003 + i + 7 for i, _ in accepted])
        for (i, instruction), (answer,) in zip(accepted, answers):
            if answer is None or not answer.strip():
                journal.add_skip(i, "teacher request failed" if answer is None else "empty answer")
                continue
            messages = _with_system(cfg.system, [{"role": "user", "content": instruction},
                                                 {"role": "assistant", "content": answer.strip()}])
            journal.add_row(i, {"messages": messages})
            bar.update(1)
    bar.close()
    if len(journal.rows) < cfg.num_rows:
        print(f"synth sft: stopped after {max_attempts} proposals with {len(journal.rows)} of {cfg.num_rows} rows "
              "(raise max_attempts, lower the similarity bar, or add seed tasks)", file=sys.stderr)


# --------------------------------------------------------------------------------------------- preference
def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def synth_preference(cfg: SynthConfig, teacher: Teacher, rewards, journal: Journal, progress: bool = True) -> None:
    import math

    from tqdm.auto import tqdm

    prompts = prompt_rows(cfg.prompts)
    todo = [i for i in range(len(prompts)) if i not in journal.done]
    batch = max(1, (cfg.teacher.concurrency if cfg.teacher.base_url else cfg.teacher.batch_size) // cfg.num_samples)
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="synth preference prompts", unit="prompt",
               disable=not progress)
    for start in range(0, len(todo), batch):
        ids = todo[start : start + batch]
        convs = [_with_system(cfg.system, _as_messages(prompts[i][0])) for i in ids]
        samples = teacher.complete(convs, cfg.num_samples, [cfg.seed * 1_000_003 + i for i in ids])
        flat_prompts, flat_completions, flat_rows, owners = [], [], [], []
        for i, replies in zip(ids, samples):
            for reply in replies:
                if reply is not None and reply.strip():
                    flat_prompts.append(prompts[i][0])
                    flat_completions.append(reply.strip())
                    flat_rows.append(prompts[i][1])
                    owners.append(i)
        totals = rewards.score(flat_prompts, flat_completions, flat_rows)[0] if flat_completions else []
        for i in ids:
            scored = [(t, c) for t, c, o in zip(totals, flat_completions, owners) if o == i and math.isfinite(t)]
            if len({c for _, c in scored}) < 2:
                journal.add_skip(i, "fewer than 2 distinct scored responses")
            else:
                best = max(scored, key=lambda tc: tc[0])
                worst = min(scored, key=lambda tc: tc[0])
                if best[0] - worst[0] <= cfg.min_margin:
                    journal.add_skip(i, f"best and worst score within min_margin {cfg.min_margin}")
                else:
                    prompt, extra = prompts[i]
                    side = (lambda text: text) if isinstance(prompt, str) else (lambda text: [{"role": "assistant", "content": text}])
                    journal.add_row(i, {**extra, "prompt": prompt, "chosen": side(best[1]), "rejected": side(worst[1]),
                                        "score_chosen": best[0], "score_rejected": worst[0]})
            bar.update(1)
    bar.close()


# --------------------------------------------------------------------------------------------- driver
def run_synth(mode: Literal["sft", "preference"], cfg: SynthConfig, *, teacher: Teacher | None = None,
              rewards=None, progress: bool = True) -> dict:
    """Generate (resuming from OUTPUT.partial.jsonl), then filter into OUTPUT; returns the counts."""
    from posttrain.curate.clean import clean

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    journal_path = out.with_name(out.name + ".partial.jsonl")
    journal = Journal(journal_path)
    resumed = len(journal.done)
    own_teacher, own_rewards = teacher is None, rewards is None
    try:
        if mode == "preference" and rewards is None:
            from posttrain.rewards.registry import RewardSet

            rewards = RewardSet.from_config(cfg.rewards, "rewards")
        teacher = teacher or make_teacher(cfg)
        if mode == "sft":
            synth_sft(cfg, teacher, journal, progress)
        else:
            synth_preference(cfg, teacher, rewards, journal, progress)
    finally:
        journal.close()
        if own_teacher and teacher is not None:
            teacher.close()
        if own_rewards and rewards is not None:
            rewards.close()
    raw = out.with_name(out.name + ".raw.jsonl")
    with raw.open("w", encoding="utf-8") as f:
        for item in sorted(journal.rows):
            f.write(json.dumps(journal.rows[item], ensure_ascii=False) + "\n")
    tokenizer = None
    if cfg.clean.max_length is not None:
        from posttrain.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.clean.model)
    res = clean(raw, out, cfg.clean, tokenizer=tokenizer)
    teacher_errors = dict(getattr(teacher, "errors", {}) or {})
    return {"mode": mode, "items": len(journal.done), "resumed": resumed, "generated": len(journal.rows),
            "skipped": dict(Counter(journal.skips.values())), "teacher_errors": teacher_errors, "clean": res,
            "raw": str(raw), "journal": str(journal_path)}


def format_summary(s: dict) -> str:
    c = s["clean"]
    skipped = "; ".join(f"{n} {k}" for k, n in sorted(s["skipped"].items(), key=lambda kv: -kv[1])) or "none"
    reasons = "; ".join(f"{n} {k}" for k, n in sorted(c["reasons"].items(), key=lambda kv: -kv[1])) or "none"
    what = "rows" if s["mode"] == "sft" else "pairs"
    lines = [f"synth {s['mode']}: {s['items']} items done ({s['resumed']} from an earlier run), {s['generated']} {what} generated, "
             f"skipped: {skipped}.",
             f"final filters: kept {c['kept']}, rejected {c['rejected']} (kept + rejected = generated: checked). Reasons: {reasons}.",
             f"kept: {c['out']}\nrejects: {c['rejects']}\nall generated: {s['raw']}\njournal (resume): {s['journal']}"]
    if s["teacher_errors"]:
        lines.insert(1, "teacher errors: " + "; ".join(f"{n} x {k}" for k, n in s["teacher_errors"].items()))
    return "\n".join(lines)
