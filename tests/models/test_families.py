"""The family matrix, exactness: every supported family's packed, unpacked, shared-prompt and preference layouts
give transformers' own eager forward, per target token, in fp32, on rows longer than every sliding window.

The truth is each example alone through ``model(...)`` with ``attn_implementation="eager"``: the family's
own attention (windows, soft-capping, sinks) and its own logits (Granite's scaling, Gemma's final soft-cap).
"""

from __future__ import annotations

import pytest
import torch

from posttrain.data.batching import collate_packed, collate_sft, pack_examples
from posttrain.data.groups import collate_groups
from posttrain.data.preference import collate_sequences
from posttrain.data.tokenize import TokenizedExample
from posttrain.errors import PosttrainError
from posttrain.models.forward import sequence_logps, target_logps
from posttrain.models.loading import load_causal_lm
from tests.families import FAMILIES, WINDOW

ALL = list(FAMILIES)
ATTENTIONS = ["auto", "eager", "sdpa"]
NO_SDPA = {"gemma2", "gpt_oss"}  # transformers refuses sdpa for them: it cannot soft-cap or add sinks


def examples(seed: int, lengths=(23, 31, 17, 40, 12, 27)) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(10, 2000, (n,), generator=gen).tolist()
        prompt = n // 3
        out.append(TokenizedExample(ids, [0] * prompt + [1] * (n - prompt)))
    return out


def eager_target_logps(model_dir, seqs: list[TokenizedExample]) -> list[torch.Tensor]:
    """Per example alone, through the family's eager forward: log p of each target token, in order."""
    model = load_causal_lm(str(model_dir), attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for ex in seqs:
            ids = torch.tensor([ex.input_ids])
            logprobs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (n - 1, V)
            targets = ids[0, 1:]
            keep = torch.tensor(ex.loss_mask[1:], dtype=torch.bool)
            out.append(logprobs.gather(1, targets[:, None])[:, 0][keep])
    return out


def _load(model_dir, family: str, attn: str):
    """The model under ``attn``; None where transformers refuses it (checked: a clear error, no traceback)."""
    if attn == "sdpa" and family in NO_SDPA:
        with pytest.raises(PosttrainError, match="use attn_implementation=auto"):
            load_causal_lm(str(model_dir), attn_implementation=attn)
        return None
    return load_causal_lm(str(model_dir), attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("family", ALL)
def test_packed_and_unpacked_sft_equal_the_eager_forward(family, attn, family_dirs):
    model_dir = family_dirs(family)
    seqs = examples(1)
    assert max(len(e.input_ids) for e in seqs) > 4 * WINDOW
    truth = torch.cat(eager_target_logps(model_dir, seqs))
    model = _load(model_dir, family, attn)
    if model is None:
        return
    with torch.no_grad():
        unpacked, _ = target_logps(model, collate_sft(seqs, pad_id=0))
        packed, _ = target_logps(model, collate_packed(pack_examples(seqs, 64), pad_id=0))
    torch.testing.assert_close(unpacked, truth, rtol=0, atol=1e-5)
    # packing reorders the targets: compare the sorted multiset, then the sums per pack exactly below
    torch.testing.assert_close(packed.sort().values, truth.sort().values, rtol=0, atol=1e-5)
    one_pack = collate_packed([seqs[:3]], pad_id=0)
    with torch.no_grad():
        in_order, _ = target_logps(model, one_pack)
    torch.testing.assert_close(in_order, torch.cat(eager_target_logps(model_dir, seqs[:3])), rtol=0, atol=1e-5)


GROUPS = [(list(range(100, 112)), [list(range(200, 214)), list(range(300, 305)), list(range(400, 420))]),
          (list(range(500, 503)), [list(range(600, 619)), list(range(700, 709)), list(range(800, 802))])]


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("family", ALL)
def test_shared_prompt_groups_equal_the_eager_forward(family, attn, family_dirs):
    """RL's layout: each prompt once, its completions attending to it (data.groups), windows by position."""
    model_dir = family_dirs(family)
    separate = [TokenizedExample(p + c, [0] * len(p) + [1] * len(c)) for p, cs in GROUPS for c in cs]
    truth = torch.stack([t.sum() for t in eager_target_logps(model_dir, separate)])
    model = _load(model_dir, family, attn)
    if model is None:
        return
    with torch.no_grad():
        got, _ = sequence_logps(model, collate_groups(GROUPS, 0, 64))
    torch.testing.assert_close(got, truth, rtol=0, atol=1e-4)  # sums of up to 20 tokens


@pytest.mark.parametrize("family", ALL)
def test_preference_packing_equals_the_eager_forward(family, family_dirs):
    """chosen + rejected sequences packed into shared rows (data.preference), under the default attention."""
    model_dir = family_dirs(family)
    seqs = examples(2, lengths=(30, 22, 35, 14))
    truth = torch.stack([t.sum() for t in eager_target_logps(model_dir, seqs)])
    model = load_causal_lm(str(model_dir)).eval()
    with torch.no_grad():
        packed, _ = sequence_logps(model, collate_sequences(seqs, 0, pack_capacity=64))
        unpacked, _ = sequence_logps(model, collate_sequences(seqs, 0, None))
    torch.testing.assert_close(packed, truth, rtol=0, atol=1e-4)
    torch.testing.assert_close(unpacked, truth, rtol=0, atol=1e-4)


def _drop(field: str):
    from posttrain.models import attention

    real = attention.LayerExtras

    def patched(window=None, softcap=None, sinks=None):
        kept = {"window": window, "softcap": softcap, "sinks": sinks}
        kept[field] = None
        return real(**kept)

    return attention, patched


MUTATIONS = {  # what a broken fast path would drop -> the families and attention that must notice
    "window": ("mistral", "auto"), "window in the exact path": ("gemma2", "auto"), "softcap": ("gemma2", "auto"),
    "sinks": ("gpt_oss", "auto"), "final soft-cap": ("gemma2", "auto"), "logits scaling": ("granite", "auto"),
    "window in eager masks": ("gemma3_text", "eager"), "window in sdpa masks": ("mistral", "sdpa"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_matrix_fails_when_a_packed_path_drops_a_feature(mutation, family_dirs, monkeypatch):
    """The exactness checks above have teeth: each family's feature, dropped, breaks them."""
    from posttrain.models import forward

    family, attn = MUTATIONS[mutation]
    if mutation in ("window", "window in the exact path", "softcap", "sinks"):
        module, patched = _drop({"window in the exact path": "window"}.get(mutation, mutation))
        monkeypatch.setattr(module, "LayerExtras", patched)
    elif mutation == "final soft-cap":
        monkeypatch.setattr(forward.LogitMap, "of", staticmethod(lambda model: forward.LogitMap(
            divisor=float(getattr(forward._causal_lm(model).config, "logits_scaling", None) or 1.0))))
    elif mutation == "logits scaling":
        monkeypatch.setattr(forward.LogitMap, "of", staticmethod(lambda model: forward.IDENTITY))
    else:
        from posttrain.models import attention

        monkeypatch.setattr(attention, "layer_windows", lambda config: {
            kind: None for kind in set(getattr(config, "layer_types", None) or ["full_attention"])})
    with pytest.raises(AssertionError):
        test_packed_and_unpacked_sft_equal_the_eager_forward(family, attn, family_dirs)


@pytest.mark.parametrize("family", ALL)
def test_full_finetune_gradients_of_packed_rows_equal_the_eager_forward(family, family_dirs):
    """posttrain's training model (fused norms, packed spans, lean head) against plain transformers eager, one
    example at a time: the loss and every parameter's gradient."""
    from posttrain.commands import load_config
    from posttrain.losses import shift_labels
    from posttrain.models.adapters import build_model

    model_dir = family_dirs(family)
    seqs = examples(3, lengths=(26, 19, 33))
    cfg = load_config("sft", None, [f"model={model_dir}", "method=full", "data.train=unused.jsonl"])
    ours, _ = build_model(cfg)
    logps, _ = target_logps(ours, collate_packed([seqs], pad_id=0))
    logps.sum().backward()
    plain = load_causal_lm(str(model_dir), attn_implementation="eager")
    total = 0.0
    for ex in seqs:
        batch = collate_sft([ex], pad_id=0)
        logits = plain(input_ids=batch["input_ids"]).logits.float()
        targets = shift_labels(batch["labels"])
        total = total - torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="sum", ignore_index=-100)
    total.backward()
    torch.testing.assert_close(logps.sum(), total, rtol=0, atol=1e-4)
    want = dict(plain.named_parameters())
    for name, param in ours.named_parameters():
        if param.grad is None and want[name].grad is None:
            continue
        torch.testing.assert_close(param.grad, want[name].grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("softcap,sinks,window", [(None, False, 40), (5.0, False, 40), (None, True, 40),
                                                  (5.0, True, None), (None, True, 300)])
def test_blocked_exact_spans_equal_one_dense_masked_attention(softcap, sinks, window):
    """Spans over several 128-row blocks, with and without a shared prefix, checkpointed with gradients: the
    outputs and the q, k, v (and sinks) gradients of the eager formula over the whole span in float64."""
    from posttrain.models import attention

    torch.manual_seed(0)
    heads, kv_heads, dim, length = 4, 2, 16, 300
    q = torch.randn(1, heads, length, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(heads, dtype=torch.float64, requires_grad=True) if sinks else None
    extras = attention.LayerExtras(window, softcap, sink)
    segments = [[(0, 20), (20, 200, 0, 20), (200, 300)]]  # a prompt, a completion seeing it, another sequence
    grad_out = torch.randn(1, length, heads, dim, dtype=torch.float64)
    out = attention._exact_segments(q, k, v, segments, 0.0, 0.25, extras)
    leaves = [q, k, v] + ([sink] if sinks else [])
    got = torch.autograd.grad((out * grad_out).sum(), leaves)

    allowed = torch.zeros(length, length, dtype=torch.bool)  # the same structure as one dense mask
    pos = torch.cat([torch.arange(20), torch.arange(20, 200), torch.arange(100)])
    allowed[:20, :20] = True
    allowed[20:200, :200] = True
    allowed[200:, 200:] = True
    allowed &= pos[None, :] <= pos[:, None]
    allowed[200:, 200:] &= torch.ones(100, 100, dtype=torch.bool).tril()
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    dense = attention._exact_attention(q, k, v, allowed[None, None], 0.25, extras, 0.0)
    want = torch.autograd.grad((dense * grad_out).sum(), leaves)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)
