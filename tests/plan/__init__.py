"""Tests of posttrain.plan."""
