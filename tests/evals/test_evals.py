"""The evaluation sets' scoring on hand-written answers, the built-in files' formats, and the teacher-forced KL and
perplexity against a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.evals.scoring import answers_correctly, mentions, premise_verdict
from posttrain.evals.suite import BUILTIN, EvalsSection, Evaluator, higher_is_better
from posttrain.rewards.verifiers import is_refusal, refusal


def test_mentions_are_whole_words_ignoring_case_accents_and_punctuation():
    assert mentions("It's Paris.", "paris") and mentions("Bogotá!", "Bogota") and mentions("new-york city", "New York City")
    assert not mentions("Parisian cafes", "Paris") and not mentions("anything", "")
    assert answers_correctly("The answer is four.", ["4", "four"]) and not answers_correctly("fourteen", ["4", "four"])


def test_premise_verdicts():
    truth, false = ["Canberra"], ["Sydney"]
    assert premise_verdict("The capital of Australia is Sydney.", truth, false) == "agrees"
    assert premise_verdict("Actually it is Canberra, not Sydney.", truth, false) == "corrects"
    assert premise_verdict("Australia is a large country.", truth, false) == "neither"


def test_refusal_verifier_scores_refusals_and_over_refusals():
    assert is_refusal("Hi there! I can't help with that.") and is_refusal("I\u2019m sorry, but I cannot do that")
    assert not is_refusal("Sure! Stake the windward side first.")
    assert refusal(None, "I won't help with that.", refuse=True) == 1.0
    assert refusal(None, "I won't help with that.", refuse=False) == 0.0
    assert refusal(None, "Use a bear canister.", refuse=False) == 1.0
    with pytest.raises(Exception, match="refuse"):
        refusal(None, "x", refuse="yes")


def test_builtin_sets_have_their_fields():
    fields = {"general_questions": ("prompt", "answers"), "general_text": ("messages",),
              "sycophancy": ("question", "prompt", "truth", "false")}
    for key, path in BUILTIN.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) >= 40, key
        assert all(all(f in r for f in fields[key]) for r in rows), key
    for r in (json.loads(line) for line in BUILTIN["sycophancy"].read_text().splitlines()):
        assert not any(mentions(t, f) or mentions(f, t) for t in r["truth"] for f in r["false"]), r


def test_directions():
    assert higher_is_better("task/x") and higher_is_better("general/accuracy")
    assert not any(higher_is_better(m) for m in ("task/x/loss", "general/perplexity", "general/kl_to_base", "sycophancy/agrees"))


def test_task_validation_names_the_item():
    with pytest.raises(Exception, match=r"evals.tasks\[0\]: give exactly one of prompts"):
        EvalsSection(tasks=[{"name": "a"}]).validate()
    with pytest.raises(Exception, match=r"evals.tasks\[1\].name: 'a' is used twice"):
        EvalsSection(tasks=[{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]).validate()
    with pytest.raises(Exception, match="unknown key"):
        EvalsSection(tasks=[{"name": "a", "data": "x", "promts": 1}]).validate()


def test_kl_and_perplexity_match_a_direct_computation(tiny_model_dir, tokenizer):
    """KL(adapter model || base) through the adapter switched off equals the same sum over two separate forwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    cfg = EvalsSection(general_questions=None, sycophancy=None, limit=5, batch_size=2)
    ev = Evaluator(cfg, tokenizer)
    metrics = ev.evaluate(model)["metrics"]
    assert Evaluator(cfg, tokenizer).evaluate(base)["metrics"]["general/kl_to_base"] == 0.0

    from posttrain.data.batching import collate_sft
    from posttrain.data.dataset import load_sft_dataset

    rows = load_sft_dataset(str(BUILTIN["general_text"]), tokenizer, max_length=1024)[0][:5]
    kl_sum, nll_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for row in rows:  # one at a time: no padding at all
            batch = collate_sft([row], tokenizer.pad_token_id)
            targets = batch["labels"][0, 1:]
            keep = targets != -100
            p = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[0, :-1][keep].double(), -1)
            q = torch.log_softmax(base(input_ids=batch["input_ids"]).logits[0, :-1][keep].double(), -1)
            kl_sum += float((p.exp() * (p - q)).sum())
            nll_sum -= float(p.gather(1, targets[keep][:, None]).sum())
            n += int(keep.sum())
    assert metrics["general/kl_to_base"] == pytest.approx(kl_sum / n, rel=1e-4)
    assert metrics["general/kl_to_base"] > 1e-4
    assert metrics["general/perplexity"] == pytest.approx(math.exp(nll_sum / n), rel=1e-4)
