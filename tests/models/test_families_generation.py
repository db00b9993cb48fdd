"""The family matrix, generation: the rollout engine and the serving decode loop equal transformers' own greedy
``model.generate`` for every family, caches included (sliding-window layers, hybrid local/global caches,
sinks), on prompts and completions longer than the windows and in left-padded batches."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.loading import load_causal_lm
from posttrain.rl.rollout import RolloutSampler, Sampling, completion_logps_reference
from posttrain.serve.decode import Delta, Finished, Job, RowSampling, decode_batch
from tests.families import FAMILIES, WINDOW

PROMPTS = [list(range(40, 45)), list(range(300, 313)), list(range(900, 920))]  # 5, 13, 20 tokens
NEW = 14  # past the 8-token windows: the sliding caches drop keys during decoding


def _greedy(model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_and_serve_decoding_equal_greedy_generate(family, family_dirs, tokenizer):
    assert max(len(p) for p in PROMPTS) + NEW > 2 * WINDOW
    model = load_causal_lm(str(family_dirs(family))).eval()
    expected = [_greedy(model, p) for p in PROMPTS]

    engine = RolloutSampler(tokenizer, eos_token_ids=[])  # no EOS: every row runs NEW tokens
    got = engine.generate(model, PROMPTS, 2, Sampling(max_new_tokens=NEW, temperature=0.0))
    for i, prompt in enumerate(PROMPTS):
        for c in got[2 * i : 2 * i + 2]:
            assert c.token_ids == expected[i], f"{family}: rollout of prompt {i} differs from generate"
            # the cached decoding's log-probs are the no-cache forward's
            reference = completion_logps_reference(model, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), reference, rtol=0, atol=1e-4)

    events: dict[int, list] = {i: [] for i in range(len(PROMPTS))}
    jobs = [Job(p, RowSampling(max_tokens=NEW, temperature=0.0, top_p=1.0), None, events[i].append)
            for i, p in enumerate(PROMPTS)]
    decode_batch(model, tokenizer, jobs, eos_ids=[], generator=None)
    for i in range(len(PROMPTS)):
        text = "".join(e.text for e in events[i] if isinstance(e, Delta))
        assert isinstance(events[i][-1], Finished) and events[i][-1].completion_tokens == NEW
        assert text == tokenizer.decode(expected[i], skip_special_tokens=True), f"{family}: serve differs"
