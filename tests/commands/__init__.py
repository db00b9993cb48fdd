"""Tests of posttrain.commands."""
