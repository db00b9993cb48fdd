"""``posttrain plan``: peak memory and FLOPs of a training step, per method, predicted before training.

:mod:`~posttrain.plan.shapes` knows model shapes (built in, or read from a local directory's config.json),
:mod:`~posttrain.plan.memory` is the analytical model of memory and FLOPs, and :mod:`~posttrain.plan.report`
formats the estimates and recommends the cheapest method that fits. docs/plan.md derives the model."""
