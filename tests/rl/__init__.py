"""Tests of posttrain.rl."""
