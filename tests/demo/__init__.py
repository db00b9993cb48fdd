"""Tests of posttrain.demo."""
