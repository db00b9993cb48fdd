"""Tests of posttrain.models."""
