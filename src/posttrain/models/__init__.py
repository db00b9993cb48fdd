"""Models: loading (safetensors only, the embedded model), methods as PEFT adapters (adapters), the lean forward and
chunked loss (forward), packed attention kernels (attention, cpu_attention, native), fused LoRA and norms, the
reference model of preference and RL stages (reference) and MoE router losses (router)."""
