"""Tests of posttrain.rewards."""
