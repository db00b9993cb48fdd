"""Tests of posttrain.feedback."""
