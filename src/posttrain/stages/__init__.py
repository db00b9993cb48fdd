"""One file per training stage (sft, rm, dpo, kto, grpo, ppo): its objective for the engine and its ``train(cfg)``,
composed from the shared parts in :mod:`posttrain.engine` and :mod:`posttrain.rl`."""
