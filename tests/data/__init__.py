"""Tests of posttrain.data."""
