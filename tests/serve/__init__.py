"""Tests of posttrain.serve."""
