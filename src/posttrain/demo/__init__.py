"""``make demo`` and ``make demo-loop``: the embedded model trained end to end on small tasks that ship with posttrain."""
