"""Training input: reading files (io), row formats (formats), tokenizing with the chat template (tokenize), loading
and validating a dataset with every drop counted (dataset), batching and packing (batching), preference and unpaired
data (preference), RL prompts (prompts) and shared-prompt RL groups (groups). Curation lives in :mod:`posttrain.curate`."""
