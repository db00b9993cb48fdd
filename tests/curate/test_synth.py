"""`posttrain data synth`: self-instruct SFT and preference pairs from a teacher, resumable, filtered.

Scripted teachers make every outcome known by construction; a fake OpenAI-compatible server checks the HTTP
teacher's retries, concurrency and rate limit; the slow test uses the embedded model as the teacher and trains
DPO on what it produced.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from posttrain.curate.synth import (
    Journal,
    SynthConfig,
    clean_instruction,
    load_synth_config,
    rouge_l,
    run_synth,
)
from posttrain.errors import ConfigError
from posttrain.openai_compat import ChatClient, RateLimiter


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


SEEDS = [
    {"messages": [{"role": "user", "content": "Write a haiku about the autumn rain falling on a quiet city."},
                  {"role": "assistant", "content": "Grey rain on rooftops..."}]},
    {"prompt": "Explain how a bicycle gear system changes the effort needed to climb hills.", "completion": "Gears..."},
    {"messages": [{"role": "user", "content": "List three ways to keep basil plants healthy indoors during winter."},
                  {"role": "assistant", "content": "Light, water, warmth."}]},
]


# ------------------------------------------------------------------------------------------ pure parts
def test_rouge_l_matches_hand_computed_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = "the cat on the mat" = 5 of 6 words each way.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS = "a c" (2); P = 2/2, R = 2/4 -> F1 = 2 * 1 * 0.5 / 1.5
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l("Same words", "same WORDS!") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "anything") == 0.0


def test_clean_instruction_strips_labels_quotes_and_extra_paragraphs():
    assert clean_instruction('Task: "Name three rivers in Africa."') == "Name three rivers in Africa."
    assert clean_instruction("4. Describe a sunset.\n\nThis task is creative.") == "Describe a sunset."
    assert clean_instruction("  New task - Plan a picnic menu for six people.  ") == "Plan a picnic menu for six people."


def test_rate_limiter_spaces_requests_by_the_rate():
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    limiter = RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(6):
        limiter.acquire()
    # A burst of 2 (one second's worth), then one request every 0.5 s.
    assert sleeps == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert now[0] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="rate_limit"):
        RateLimiter(-1)


# ------------------------------------------------------------------------------------------ fake endpoint
class FakeOpenAI:
    """A chat-completions server: fails the first `fail_first` requests with 429, answers with `reply(body)`."""

    def __init__(self, reply, fail_first: int = 0, delay: float = 0.0):
        self.reply, self.fail_first, self.delay = reply, fail_first, delay
        self.lock = threading.Lock()
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.bodies.append(body)
                time.sleep(outer.delay)
                with outer.lock:
                    outer.in_flight -= 1
                if n <= outer.fail_first:
                    data, status = b'{"error": "slow down"}', 429
                else:
                    content = outer.reply(body)
                    data, status = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode(), 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_chat_client_retries_429_and_bounds_concurrency():
    server = FakeOpenAI(lambda body: "ok " + body["messages"][-1]["content"], fail_first=2, delay=0.05)
    try:
        client = ChatClient(server.url, "m", retries=3, backoff=0.0, concurrency=3)
        replies = client.map([[{"role": "user", "content": str(i)}] for i in range(12)], temperature=0.5)
        assert [r for r, _ in replies] == [f"ok {i}" for i in range(12)]
        assert all(e is None for _, e in replies)
        assert server.requests == 14 == client.requests  # 12 answers + 2 retried 429s
        assert 1 < server.max_in_flight <= 3
        assert server.bodies[-1]["temperature"] == 0.5 and server.bodies[-1]["model"] == "m"
        client.close()
    finally:
        server.close()


def test_chat_client_gives_up_with_the_reason():
    server = FakeOpenAI(lambda body: "never", fail_first=100)
    try:
        client = ChatClient(server.url, "m", retries=1, backoff=0.0)
        (reply, error), = client.map([[{"role": "user", "content": "x"}]])
        assert reply is None and "HTTP 429" in error and "after 2 attempts" in error
    finally:
        server.close()
    with pytest.raises(ConfigError, match="base_url"):
        ChatClient("localhost:8000", "m")


# ------------------------------------------------------------------------------------------ sft
class ScriptedTeacher:
    """Proposal requests (they contain 'example tasks') get the next scripted proposal; others get an answer."""

    def __init__(self, proposals: list[str], interrupt_after: int | None = None):
        self.proposals = list(proposals)
        self.calls = 0
        self.interrupt_after = interrupt_after
        self.errors: dict = {}

    def complete(self, conversations, n, seeds):
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            if "example tasks" in text:
                out.append([self.proposals.pop(0) if self.proposals else None for _ in range(n)])
            else:
                out.append([f"Answer to: {text}" for _ in range(n)])
        return out

    def close(self):
        pass


def sft_config(tmp_path, **kw) -> SynthConfig:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    values = {"seeds": str(seeds), "output": str(tmp_path / "out" / "sft.jsonl"), "teacher": {"batch_size": 2}, **kw}
    from posttrain.config import build

    cfg = build(SynthConfig, values)
    cfg.validate("sft")
    return cfg


def test_sft_keeps_novel_proposals_and_counts_every_skip(tmp_path):
    proposals = [
        "Write a haiku about the autumn rain falling on a quiet town.",      # ROUGE-L 0.91 with seed 1: skipped
        "Too short",                                                         # 2 words: skipped
        "Describe the life cycle of a monarch butterfly in simple terms.",   # kept
        "Suggest a weekly budget plan for a student living alone.",          # kept
        "Describe the life cycle of a monarch butterfly in simple words.",   # near the kept one (pool grows): skipped
        "Compare the climates of Norway and Portugal for a traveller.",      # kept
    ]
    cfg = sft_config(tmp_path, num_rows=3)
    summary = run_synth("sft", cfg, teacher=ScriptedTeacher(proposals), progress=False)
    rows = read_jsonl(cfg.output)
    assert [r["messages"][0]["content"] for r in rows] == [proposals[2], proposals[3], proposals[5]]
    assert rows[0]["messages"][1] == {"role": "assistant", "content": f"Answer to: {proposals[2]}"}
    assert summary["generated"] == 3
    assert summary["skipped"] == {"proposal ROUGE-L >= 0.7 with the pool": 2, "proposal not 3-150 words": 1}
    assert summary["clean"]["kept"] + summary["clean"]["rejected"] == 3


def test_sft_resumes_after_an_interrupt_without_losing_or_repeating_rows(tmp_path):
    proposals = ["Describe how volcanoes form along tectonic plate boundaries.",
                 "Write a short poem about a lighthouse keeper's loneliness.",
                 "Explain compound interest using a savings account example.",
                 "Give tips for learning to juggle three balls quickly.",
                 "Summarise the plot of a heist story set on a moving train.",
                 "Recommend exercises for improving posture at a desk job."]
    cfg = sft_config(tmp_path, num_rows=5)
    first = ScriptedTeacher(proposals, interrupt_after=3)  # proposals (1), answers (2), proposals (3), then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        run_synth("sft", cfg, teacher=first, progress=False)
    journal = read_jsonl(Path(cfg.output + ".partial.jsonl"))
    assert [e["id"] for e in journal] == [0, 1]  # the first batch's two rows, each flushed when finished
    second = ScriptedTeacher(proposals[4:] + proposals[2:4])  # the interrupted batch's proposals come again
    summary = run_synth("sft", cfg, teacher=second, progress=False)
    rows = read_jsonl(cfg.output)
    assert summary["resumed"] == 2 and summary["generated"] == 5
    asked = [r["messages"][0]["content"] for r in rows]
    assert asked[:2] == proposals[:2] and len(set(asked)) == 5


def test_final_pass_filters_generated_rows_with_reasons(tmp_path):
    class BadAnswers(ScriptedTeacher):
        def complete(self, conversations, n, seeds):
            out = super().complete(conversations, n, seeds)
            return [["As an AI language model, I cannot do that." if "volcano" in c[-1]["content"] else r[0]]
                    if "example tasks" not in c[-1]["content"] else r for c, r in zip(conversations, out)]

    proposals = ["Describe how volcanoes form along tectonic plate boundaries.",
                 "Write a short poem about a lighthouse keeper's loneliness."]
    cfg = sft_config(tmp_path, num_rows=2)
    summary = run_synth("sft", cfg, teacher=BadAnswers(proposals), progress=False)
    assert summary["clean"]["kept"] == 1 and summary["clean"]["reasons"] == {"boilerplate/refusal": 1}
    rejects = read_jsonl(Path(summary["clean"]["rejects"]))
    assert rejects[0]["reason"] == "boilerplate/refusal" and "volcanoes" in json.dumps(rejects[0]["row"])


def test_sft_through_an_openai_compatible_endpoint(tmp_path):
    proposals = iter(["Describe how volcanoes form along tectonic plate boundaries.",
                      "Write a short poem about a lighthouse keeper's loneliness.",
                      "Explain compound interest using a savings account example."])
    lock = threading.Lock()

    def reply(body):
        text = body["messages"][-1]["content"]
        if "example tasks" in text:
            with lock:
                return next(proposals)
        return "Here is a careful answer."

    server = FakeOpenAI(reply, fail_first=1)
    try:
        cfg = sft_config(tmp_path, num_rows=3, teacher={"base_url": server.url, "model": "teacher-x", "concurrency": 1,
                                                        "retries": 2, "rate_limit": 100})
        summary = run_synth("sft", cfg, progress=False)
    finally:
        server.close()
    assert summary["generated"] == 3 and summary["clean"]["kept"] == 3
    assert server.bodies[0]["model"] == "teacher-x" and server.bodies[0]["max_tokens"] == 256


# ------------------------------------------------------------------------------------------ preference
class FixedTeacher:
    def __init__(self, answers: dict[str, list[str]]):
        self.answers, self.errors = answers, {}

    def complete(self, conversations, n, seeds):
        return [self.answers[c[-1]["content"]][:n] for c in conversations]

    def close(self):
        pass


class LengthReward:
    """Shorter is better (scores -len); a stand-in for a RewardSet."""

    def score(self, prompts, completions, rows):
        return [-float(len(c)) for c in completions], {}

    def close(self):
        pass


def test_preference_pairs_best_and_worst_and_skips_ties(tmp_path, tokenizer):
    from posttrain.data.preference import load_pair_dataset

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Say hi.", "answer": "hi"},
        {"prompt": [{"role": "user", "content": "Greet me."}]},
        {"prompt": "Tie?"},
    ])
    teacher = FixedTeacher({"Say hi.": ["Hi!", "Hello there, friend!", "Hey."],
                            "Greet me.": ["Good morning to you!", "Hello."],
                            "Tie?": ["same", "same"]})
    cfg = _cfg_pref(tmp_path, prompts, num_samples=3)
    summary = run_synth("preference", cfg, teacher=teacher, rewards=LengthReward(), progress=False)
    rows = read_jsonl(cfg.output)
    assert rows[0]["prompt"] == "Say hi." and rows[0]["chosen"] == "Hi!" and rows[0]["rejected"] == "Hello there, friend!"
    assert rows[0]["answer"] == "hi" and rows[0]["score_chosen"] == -3.0  # extra columns kept
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "Hello."}]  # conversational prompt -> message lists
    assert summary["skipped"] == {"fewer than 2 distinct scored responses": 1}
    pairs, report = load_pair_dataset(cfg.output, tokenizer, max_length=128)
    assert len(pairs) == 2  # the DPO loader accepts every row


def _cfg_pref(tmp_path, prompts, **kw) -> SynthConfig:
    from posttrain.config import build

    cfg = build(SynthConfig, {"prompts": str(prompts), "output": str(tmp_path / "prefs.jsonl"),
                               "rewards": [{"function": "numeric_match"}], **kw})
    cfg.validate("preference")
    return cfg


def test_bad_config_is_a_clear_error_before_any_compute(tmp_path):
    with pytest.raises(ConfigError, match="prompts: required"):
        load_synth_config(None, ["output=x.jsonl", "rewards=[{function: numeric_match}]"], "preference")
    with pytest.raises(ConfigError, match="rewards: required"):
        load_synth_config(None, ["output=x.jsonl", f"prompts={write_jsonl(tmp_path / 'p.jsonl', [{'prompt': 'x'}])}"], "preference")
    with pytest.raises(ConfigError, match="seeds: .*no such file"):
        load_synth_config(None, ["output=x.jsonl", "seeds=missing.jsonl"], "sft")
    with pytest.raises(ConfigError, match="num_samples"):
        _cfg_pref(tmp_path, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}]), num_samples=1)


def test_journal_tolerates_a_line_cut_by_a_crash(tmp_path):
    path = tmp_path / "j.partial.jsonl"
    path.write_text('{"id": 0, "row": {"a": 1}}\n{"id": 1, "skip": "x"}\n{"id": 2, "ro')
    j = Journal(path)
    assert j.rows == {0: {"a": 1}} and j.skips == {1: "x"} and j.done == {0, 1}
    j.close()


def test_cli_synth_sft_end_to_end(tmp_path, tiny_model_dir):
    """The CLI with a local (tiny random) teacher: proposals are gibberish, so most are skipped, but every
    item is accounted for and the files exist."""
    from posttrain.commands.data import main

    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    out = tmp_path / "o" / "sft.jsonl"
    code = main(["synth", "sft", f"seeds={seeds}", f"output={out}", f"teacher.model={tiny_model_dir}", "num_rows=2",
                 "max_attempts=4", "sampling.max_new_tokens=12", "max_similarity=1.0"])
    assert code == 0
    journal = read_jsonl(Path(str(out) + ".partial.jsonl"))
    assert sorted(e["id"] for e in journal) == list(range(len(journal))) and 2 <= len(journal) <= 4
    assert out.exists() and Path(str(out) + ".rejects.jsonl").exists()


@pytest.mark.vllm
def test_local_teacher_on_vllm_generates_n_seeded_answers(tmp_path, vllm_model_dir):
    """teacher.engine=vllm: the same Teacher contract (n answers per conversation, the same for the same seeds),
    generated by an in-process vLLM engine; the CLI runs end to end with it."""
    pytest.importorskip("vllm")
    from posttrain.commands.data import main
    from posttrain.curate.synth import LocalTeacher, SynthSampling, TeacherSection

    teacher = LocalTeacher(TeacherSection(model=str(vllm_model_dir), engine="vllm"),
                           SynthSampling(max_new_tokens=8, temperature=1.0, top_p=1.0))
    try:
        conv = [[{"role": "user", "content": "Name a colour."}], [{"role": "user", "content": "Count to three."}]]
        a = teacher.complete(conv, 3, [7, 8])
        b = teacher.complete(conv, 3, [7, 8])
        assert [len(x) for x in a] == [3, 3] and a == b and all(isinstance(t, str) for x in a for t in x)
    finally:
        teacher.close()
    seeds = write_jsonl(tmp_path / "seeds.jsonl", SEEDS)
    out = tmp_path / "o" / "sft.jsonl"
    assert main(["synth", "sft", f"seeds={seeds}", f"output={out}", f"teacher.model={vllm_model_dir}",
                 "teacher.engine=vllm", "num_rows=2", "max_attempts=4", "sampling.max_new_tokens=12",
                 "max_similarity=1.0"]) == 0
    assert out.exists()


@pytest.mark.slow
def test_embedded_teacher_makes_pairs_that_dpo_trains_on(tmp_path):
    """Done-when of issue 6: the embedded model as teacher produces a preference set the DPO stage accepts."""
    import importlib

    from posttrain.commands import load_config
    from posttrain.demo.arith_task import make_rows

    prompts = write_jsonl(tmp_path / "prompts.jsonl", make_rows(4, "train", 0))
    cfg = _cfg_pref(tmp_path, prompts, num_samples=6, sampling={"max_new_tokens": 32, "temperature": 1.0})
    summary = run_synth("preference", cfg, progress=False)
    assert summary["items"] == 4 and summary["generated"] + sum(summary["skipped"].values()) == 4
    assert summary["clean"]["kept"] >= 1, summary
    rows = read_jsonl(cfg.output)
    assert all(r["score_chosen"] == 1.0 and r["score_rejected"] == 0.0 for r in rows)  # numeric_match is 0/1
    dpo = load_config("dpo", None, ["model=smollm2-135m", f"data.train={cfg.output}", f"output_dir={tmp_path / 'dpo'}",
                                    "max_steps=1", "batch_size=1", "tensorboard=false", "max_length=256"])
    importlib.import_module("posttrain.stages.dpo").train(dpo)
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()
