"""Tests of posttrain.curate."""
