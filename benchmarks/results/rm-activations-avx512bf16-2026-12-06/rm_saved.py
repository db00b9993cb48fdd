"""Saved-for-backward bytes of one posttrain RM micro-batch (8 pairs, ~440 tokens each), by the op that saved them."""
import sys, random, collections, tempfile, json, resource
import torch
from pathlib import Path
from posttrain.commands import load_config
from posttrain.models.adapters import build_model
from posttrain.models.loading import resolve_model
from posttrain.data.preference import PairExample, collate_pairs
from posttrain.data.tokenize import TokenizedExample
from posttrain.models.forward import sequence_scores
from posttrain.losses import bradley_terry_loss
from posttrain.runtime import keep_cpu_heap
keep_cpu_heap()
d = Path(tempfile.mkdtemp()); (d / "t.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
prec = sys.argv[1] if len(sys.argv) > 1 else "bf16"
cfg = load_config("rm", None, [f"model={resolve_model('smollm2-135m')}", "method=lora", f"data.train={d/'t.jsonl'}",
    f"output_dir={d/'o'}", "lora.r=16", "lora.alpha=32", "lora.dropout=0", "lora.target_modules=all-linear", "max_length=512"])
model, _ = build_model(cfg, mixed_precision="bf16" if prec == "bf16" else "no", task="seq_cls", pad_token_id=0)
model.train()
rng = random.Random(0)
def seq():
    n = rng.randint(380, 500); p = rng.randint(40, 120)
    return TokenizedExample([rng.randrange(100, 40000) for _ in range(n)], [0] * p + [1] * (n - p))
pairs = [PairExample(seq(), seq()) for _ in range(8)]
batch = collate_pairs(pairs, 0, 512)
print("rows", tuple(batch["input_ids"].shape))
saved = collections.Counter(); seen = {}
def pack(t):
    key = (t.untyped_storage().data_ptr())
    if key not in seen:
        seen[key] = t.untyped_storage().nbytes()
    return t
def unpack(t): return t
import traceback
by = collections.Counter()
def pack2(t):
    k = t.untyped_storage().data_ptr()
    if k not in seen:
        seen[k] = t.untyped_storage().nbytes()
        by[(str(t.dtype), tuple(t.shape)[-1] if t.dim() else 0)] += t.untyped_storage().nbytes()
    return t
with torch.autograd.graph.saved_tensors_hooks(pack2, unpack), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
    scores = sequence_scores(model, batch)
    loss = bradley_terry_loss(scores[:8], scores[8:])[0]
print(f"saved total {sum(seen.values())/1e6:.0f} MB")
for k, v in by.most_common(15): print(k, f"{v/1e6:.0f} MB")
loss.backward()
print("peak RSS MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
