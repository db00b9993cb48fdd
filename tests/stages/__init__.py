"""Tests of posttrain.stages."""
