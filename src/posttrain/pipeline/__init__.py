"""Staged strategies as one run: ``posttrain pipeline RECIPE.yaml`` chains sft -> dpo/kto -> grpo/ppo (and side
reward models) with an evaluation and gates after every stage (:mod:`~posttrain.pipeline.recipe`,
:mod:`~posttrain.pipeline.run`, :mod:`~posttrain.pipeline.report`), and ``posttrain compare`` measures one SFT
config under several parameter-update methods (:mod:`~posttrain.pipeline.compare`)."""
