"""The built-in tasks behind `make demo`, the shipped recipes (`examples/recipes/`) and `make demo-loop`: small tasks on the embedded model that ship with posttrain."""
