"""The training engine: one explicit loop on accelerate (trainer), the setup every stage shares (setup), checkpoints
with exact resume (checkpoint) and metrics logging and plots (metrics)."""
