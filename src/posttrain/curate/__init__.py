"""Data curation, before any compute is spent: audit a dataset, clean it, synthesise more. The checks are modules of
their own (rows, contamination, dedup, pii, consistency, accuracy, diversity, embed) shared by audit, clean and synth;
the command line is :mod:`posttrain.commands.data`."""
