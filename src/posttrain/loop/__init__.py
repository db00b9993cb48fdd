"""The live feedback loop: registry of versions, promotion gates, and the cycle (see :mod:`posttrain.loop.run`)."""
