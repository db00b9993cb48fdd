"""Tests of posttrain.loop."""
