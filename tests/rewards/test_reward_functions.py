"""Reward sources for RL: the shipped verifiers, the code sandbox, user functions in a worker, and the judge.

The judge runs against a small OpenAI-compatible server on 127.0.0.1 (http.server in a thread) whose replies
each test scripts. Timeouts are 0.5-1 s, so the file takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards.functions import FunctionReward, VerifierReward, load_reward_function
from posttrain.rewards.judge import JudgeReward, parse_score
from posttrain.rewards.sandbox import OUTPUT_LIMIT, run_python
from posttrain.rewards.verifiers import code_tests, exact_match, json_schema, numeric_match, regex_match

# -- verifiers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, answer, expected", [
    ("Paris", "paris", 1.0),
    ("  PARIS!  ", "Paris", 1.0),
    ("The capital is \\boxed{Paris}.", "Paris", 1.0),
    ("so x = \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces
    ("Let me think.\n**Answer:** New   York.\nDone.", "new york", 1.0),
    ("6 * 12 = 72\n#### 72", "She sold 6 * 12 = 72 clips.\n#### 72", 1.0),  # GSM8K-style reference
    ("The answer is Paris.", "Paris", 0.0),  # no marker: the whole text is the answer
    ("\\boxed{Lyon}", "Paris", 0.0),
])
def test_exact_match(completion, answer, expected):
    assert exact_match("q", completion, answer=answer) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("The total is 1,234.", "1234", 1.0),
    ("It costs $1,234,567.50 in all", 1234567.5, 1.0),
    ("first 5, then the result is -3.5", "-3.5", 1.0),
    ("the probability is 3/4", "0.75", 1.0),
    ("0.1 + 0.2 = 0.30000000000000004", 0.3, 1.0),
    ("first 5 then 7", 5, 0.0),  # the LAST number counts
    ("Step 2: 6 * 12 = 72\n#### 72", "She sold 72 clips.\n#### 72", 1.0),
    ("3-4", 4, 1.0),  # a range, not minus four
    ("no digits at all", 3, 0.0),
    ("version x2", 2, 0.0),  # a digit inside a word is not a number
])
def test_numeric_match(completion, answer, expected):
    assert numeric_match("q", completion, answer=answer) == expected


def test_numeric_match_tolerance_and_bad_reference():
    assert numeric_match("q", "about 101", answer=100, rel_tol=0.02) == 1.0
    assert numeric_match("q", "about 101", answer=100) == 0.0
    with pytest.raises(ConfigError, match="'unknown' holds no number"):
        numeric_match("q", "42", answer="unknown")


def test_regex_match():
    assert regex_match("q", "Final: YES", pattern=r"(?i)\byes\b") == 1.0
    assert regex_match("q", "Final: YES", pattern=r"YES", full=True) == 0.0
    assert regex_match("q", "YES", pattern=r"YES", full=True) == 1.0
    with pytest.raises(ConfigError, match=r"pattern '\(unclosed' is not a valid regular expression"):
        regex_match("q", "x", pattern="(unclosed")


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.mark.parametrize("completion, expected", [
    ('{"name": "Ada", "age": 36}', 1.0),
    ('Here you go:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?', 1.0),
    ('Sure! {"name": "Ada", "age": 36} is the record.', 1.0),
    ('{"name": "Ada", "age": "thirty-six"}', 0.0),  # schema violation
    ('{"name": "Ada"}', 0.0),  # missing required key
    ('{"name": "Ada", "age": 36', 0.0),  # not JSON
    ("no json here", 0.0),
])
def test_json_schema(completion, expected):
    assert json_schema("q", completion, schema=SCHEMA) == expected
    assert json_schema("q", completion, schema=json.dumps(SCHEMA)) == expected  # a schema given as a JSON string


def test_json_schema_without_schema_and_bad_schema():
    assert json_schema("q", "[1, 2]") == 1.0
    assert json_schema("q", "nope") == 0.0
    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        json_schema("q", "{}", schema={"type": "no-such-type"})
    with pytest.raises(ConfigError, match="is not valid JSON"):
        json_schema("q", "{}", schema="{not json")


ADD = "Here is my solution:\n```python\ndef add(a, b):\n    return a + b\n```\n"


def test_code_tests_pass_fail_and_syntax_error():
    assert code_tests("q", ADD, tests="assert add(2, 3) == 5") == 1.0
    assert code_tests("q", ADD, tests=["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]) == 1.0
    assert code_tests("q", ADD, tests="assert add(2, 3) == 6") == 0.0
    assert code_tests("q", "```python\ndef add(a, b)\n    return a + b\n```", tests="assert add(1, 1) == 2") == 0.0
    # the last python block counts; a bare completion is code as a whole
    two_blocks = "```python\ndef add(a, b): return 0\n```\nFixed:\n```python\ndef add(a, b): return a + b\n```"
    assert code_tests("q", two_blocks, tests="assert add(2, 3) == 5") == 1.0
    assert code_tests("q", "def add(a, b):\n    return a + b", tests="assert add(2, 3) == 5") == 1.0
    with pytest.raises(ConfigError, match="tests are ''"):
        code_tests("q", ADD, tests="")


def test_code_tests_infinite_loop_times_out():
    start = time.monotonic()
    assert code_tests("q", "```python\nwhile True:\n    pass\n```", tests="pass", timeout=1.0) == 0.0
    assert time.monotonic() - start < 5


def test_code_tests_memory_hog_hits_the_limit():
    hog = "```python\nblob = bytearray(2 * 1024**3)\n```"
    assert code_tests("q", hog, tests="pass", memory_mb=256) == 0.0
    result = run_python("blob = bytearray(2 * 1024**3)", timeout=5, memory_mb=256)
    assert result.returncode == 1 and "MemoryError" in result.stderr and not result.timed_out


def test_sandbox_strips_the_environment_and_caps_output(monkeypatch):
    monkeypatch.setenv("SECRET_API_KEY", "sk-do-not-leak")
    result = run_python("import os\nprint(sorted(os.environ)); print(os.getcwd())\nprint('x' * 200_000)",
                        timeout=5, memory_mb=512)
    assert result.returncode == 0 and not result.timed_out
    assert "SECRET_API_KEY" not in result.stdout and "HTTPS_PROXY" not in result.stdout
    assert "posttrain-sandbox-" in result.stdout  # runs in its own temporary directory
    assert len(result.stdout) < OUTPUT_LIMIT + 100 and "more bytes truncated" in result.stdout
    slept = run_python("import time\ntime.sleep(30)", timeout=0.5, memory_mb=512)
    assert slept.timed_out and slept.returncode == -9


# -- verifiers as batch sources -------------------------------------------------------------------------------


def test_load_reward_function_runs_verifiers_in_process():
    source = load_reward_function("exact_match")
    assert isinstance(source, VerifierReward) and source.name == "exact_match"
    assert source(["q", "q"], ["\\boxed{4}", "5"], [{"answer": "4"}, {"answer": "4"}]) == [1.0, 0.0]
    full = load_reward_function("posttrain.rewards.verifiers:regex_match", {"pattern": "^ok"}, name="starts_ok")
    assert full.name == "starts_ok" and full(["q"], ["ok then"], [{}]) == [1.0]
    # config kwargs win over a data column of the same name
    assert full(["q"], ["ok then"], [{"pattern": "^no"}]) == [1.0]


def test_verifier_sources_report_config_errors_early():
    with pytest.raises(ConfigError, match=r"pattern '\[' is not a valid"):
        load_reward_function("regex_match", {"pattern": "["})
    with pytest.raises(ConfigError, match="has no verifier 'fuzzy_match'"):
        load_reward_function("posttrain.rewards.verifiers:fuzzy_match")
    with pytest.raises(ConfigError, match=r"row 1 has no \['answer'\]"):
        load_reward_function("numeric_match")(["q", "q"], ["1", "2"], [{"answer": 1}, {"solution": 2}])


def test_verifier_source_counts_a_failing_row_as_nan():
    source = load_reward_function("code_tests", {"timeout": 2})
    scores = source(["q", "q"], [ADD, ADD], [{"tests": "assert add(1, 2) == 3"}, {"tests": "x", "memory_mb": -1}])
    assert scores[0] == 1.0 and math.isnan(scores[1])
    assert source.errors == 1 and "row 1: ValueError" in source.last_error


# -- user functions in a worker subprocess ------------------------------------------------------------------


USER_MODULE = '''
import time

NOT_CALLABLE = 3

def length(prompt, completion, bonus=0, **row):
    print("stray output must not break the protocol")
    return len(completion) + bonus + (100 if isinstance(prompt, list) else 0)

def picky(prompt, completion, **row):
    if completion == "boom":
        raise ValueError("cannot score boom")
    return 1.0

def wordy(prompt, completion, **row):
    return "high" if completion == "x" else 0.5

def slow(prompt, completion, **row):
    if completion == "hang":
        time.sleep(60)
    return 1.0
'''


@pytest.fixture
def user_module(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('bad import')\n")
    return path


def test_function_reward_scores_a_batch_in_a_worker(user_module):
    with FunctionReward(f"{user_module}:length", kwargs={"bonus": 10}) as source:
        assert source.name == "length"
        chat = [{"role": "user", "content": "hi"}]
        assert source(["q", chat], ["abc", "de"], [{"answer": 1}, {}]) == [13.0, 112.0]
        assert source([], [], []) == []
        assert source.errors == 0
        worker = source._proc
    assert worker.poll() is not None  # close() stopped it


def test_function_reward_imports_a_module_from_the_working_directory(user_module, monkeypatch):
    monkeypatch.chdir(user_module.parent)
    source = load_reward_function("my_rewards:picky")
    assert isinstance(source, FunctionReward)
    with source:
        scores = source(["q"] * 3, ["a", "boom", "c"], [{}, {}, {}])
        assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 1.0
        assert source.errors == 1 and "row 1: ValueError: cannot score boom" in source.last_error


def test_function_reward_non_numeric_return_is_nan(user_module):
    with FunctionReward(f"{user_module}:wordy") as source:
        scores = source(["q", "q"], ["x", "y"], [{}, {}])
        assert math.isnan(scores[0]) and scores[1] == 0.5
        assert source.errors == 1 and "returned str 'high', expected a number" in source.last_error


def test_function_reward_timeout_kills_and_restarts_the_worker(user_module):
    with FunctionReward(f"{user_module}:slow", timeout=1.0) as source:
        first_worker = source._proc
        start = time.monotonic()
        scores = source(["q"] * 3, ["ok", "hang", "ok"], [{}, {}, {}])
        assert time.monotonic() - start < 3
        assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[2])
        assert source.errors == 2 and "timed out after 1 s" in source.last_error
        assert first_worker.poll() is not None
        assert source(["q"], ["ok"], [{}]) == [1.0]  # a fresh worker
        assert source._proc is not first_worker


@pytest.mark.parametrize("ref, message", [
    ("no_colon_here", "expected 'package.module:function'"),
    ("{dir}/missing.py:fn", "does not exist"),
    ("no_such_module_xyz:fn", "module 'no_such_module_xyz' not found"),
    ("{dir}/my_rewards.py:nope", "has no attribute 'nope'"),
    ("{dir}/my_rewards.py:NOT_CALLABLE", "is a int, not a callable"),
    ("{dir}/broken_rewards.py:fn", "raised RuntimeError: bad import"),
])
def test_function_reward_bad_ref_is_a_config_error(user_module, ref, message):
    ref = ref.format(dir=user_module.parent)
    with pytest.raises(ConfigError, match=message) as error:
        FunctionReward(ref)
    assert repr(ref) in str(error.value)


def test_function_reward_worker_dies_with_the_interpreter(user_module):
    script = f"from posttrain.rewards.functions import FunctionReward\n" \
             f"source = FunctionReward({str(user_module) + ':picky'!r})\nprint(source._proc.pid)\n"
    pid = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             timeout=30).stdout)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the judge -------------------------------------------------------------------------------------------------


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions: ``script`` holds actions for the next requests (an HTTP status,
    or "sleep"); otherwise it answers "Score: N" for a response containing "worth N"."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                action = fake.script.pop(0) if fake.script else 200
                if action == "sleep":
                    time.sleep(1.5)
                    action = 200
                content = body["messages"][0]["content"]
                worth = content.split("worth ")[-1].split()[0] if "worth " in content else None
                reply = f"Reasoning about it.\nScore: {worth}" if worth else "I cannot decide."
                payload = {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                data = json.dumps(payload if action == 200 else {"error": f"status {action}"}).encode()
                self.send_response(action)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def fake_judge():
    fake = FakeJudge()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def judge(fake, **kwargs):
    return JudgeReward(fake.url, "judge-model", api_key_env="TEST_JUDGE_KEY", timeout=kwargs.pop("timeout", 5),
                       backoff=0.01, **kwargs)


def test_parse_score():
    assert parse_score("Clear and correct.\nScore: 10") == 1.0
    assert parse_score("**Score:** 4.") == pytest.approx(3 / 9)
    assert parse_score("I'd give it 7/10.") == pytest.approx(6 / 9)
    assert parse_score("Five points: 1, 2, 3. Overall 8") == pytest.approx(7 / 9)
    assert parse_score("Score: 11") is None and parse_score("no idea") is None


def test_judge_scores_a_batch(fake_judge, monkeypatch):
    monkeypatch.delenv("TEST_JUDGE_KEY", raising=False)
    with judge(fake_judge) as source:
        chat = [{"role": "user", "content": "Say hi"}]
        scores = source(["q", chat, "q"], ["worth 7", "worth 10", "meh"], [{}, {}, {}])
    assert scores[:2] == [pytest.approx(6 / 9), 1.0] and math.isnan(scores[2])
    assert source.errors == 1 and "no score in 1..10" in source.last_error
    request = fake_judge.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["body"]["model"] == "judge-model"
    assert all("Authorization" not in r["headers"] for r in fake_judge.requests)
    assert any("user: Say hi" in r["body"]["messages"][0]["content"] for r in fake_judge.requests)


@pytest.mark.parametrize("status", [500, 429])
def test_judge_retries_server_errors(fake_judge, status):
    fake_judge.script = [status]
    with judge(fake_judge, retries=2) as source:
        assert source(["q"], ["worth 4"], [{}]) == [pytest.approx(3 / 9)]
    assert len(fake_judge.requests) == 2 and source.errors == 0


def test_judge_does_not_retry_a_client_error(fake_judge):
    fake_judge.script = [400]
    with judge(fake_judge, retries=3) as source:
        assert math.isnan(source(["q"], ["worth 4"], [{}])[0])
    assert len(fake_judge.requests) == 1
    assert source.errors == 1 and "HTTP 400 (not retried)" in source.last_error


def test_judge_timeout_is_nan(fake_judge):
    fake_judge.script = ["sleep"]
    with judge(fake_judge, timeout=0.3, retries=0) as source:
        assert math.isnan(source(["q"], ["worth 4"], [{}])[0])
    assert source.errors == 1 and "timed out" in source.last_error


def test_judge_cache_makes_repeats_free(fake_judge, tmp_path):
    cache = tmp_path / "judge.sqlite"
    with judge(fake_judge, cache_path=cache) as source:
        # identical pairs in one batch share a request
        assert source(["q", "q"], ["worth 9", "worth 9"], [{}, {}]) == [pytest.approx(8 / 9)] * 2
        assert source(["q"], ["worth 9"], [{}]) == [pytest.approx(8 / 9)]
    assert len(fake_judge.requests) == 1
    with judge(fake_judge, cache_path=cache) as reopened:  # a new process would read the same file
        assert reopened(["q"], ["worth 9"], [{}]) == [pytest.approx(8 / 9)]
    assert len(fake_judge.requests) == 1 and reopened.requests == 0


def test_judge_sends_the_api_key_from_the_environment(fake_judge, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    with judge(fake_judge) as source:
        source(["q"], ["worth 5"], [{}])
    assert fake_judge.requests[0]["headers"]["Authorization"] == "Bearer sk-test-123"
    assert "sk-test-123" not in repr(vars(source))


def test_judge_config_errors():
    with pytest.raises(ConfigError, match="base_url 'localhost:8000' must start with http"):
        JudgeReward("localhost:8000", "m")
    with pytest.raises(ConfigError, match="no {completion} placeholder"):
        JudgeReward("http://localhost:8000/v1", "m", template="Rate {prompt}")


def test_every_source_has_the_batch_interface(user_module, fake_judge):
    sources = [load_reward_function("exact_match"), FunctionReward(f"{user_module}:picky"), judge(fake_judge)]
    for source in sources:
        with source:
            assert isinstance(source.name, str) and source.errors == 0
            assert len(source(["q"], ["worth 3"], [{"answer": "x"}])) == 1
