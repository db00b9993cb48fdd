"""Write a randomly initialised model with the shape of a given one: its config and tokenizer, new weights.

Throughput and memory depend on a model's shape, not its weights, so a machine that cannot receive the real
weights (the embedded SmolLM2 GGUF is 98 MB; some benchmark machines take only a few tens of MB and have no
network) can still run the same benchmark:

    python benchmarks/random_model.py CONFIG_DIR OUT_DIR [--seed 0] [--dtype float32]

CONFIG_DIR holds config.json and the tokenizer files (tokenizer.json, tokenizer_config.json, chat template);
OUT_DIR gets those plus model.safetensors. The same seed gives the same weights, so every tool in a
benchmark starts from one model. Losses from such a model say nothing about the real one; only comparisons
between tools on it are meaningful.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config_dir", type=Path, help="directory with config.json and tokenizer files")
    p.add_argument("out_dir", type=Path, help="directory to write (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (args.config_dir / "config.json").is_file():
        p.error(f"{args.config_dir}/config.json not found")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for f in args.config_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, args.out_dir / f.name)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out_dir, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"random {config.model_type} model, {n / 1e6:.1f}M parameters, seed {args.seed}: {args.out_dir}")


if __name__ == "__main__":
    main()
