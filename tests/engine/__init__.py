"""Tests of posttrain.engine."""
