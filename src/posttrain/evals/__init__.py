"""Evaluation of a policy between training stages: the task it was trained for, what it may have forgotten,
and whether it became sycophantic. Used by ``posttrain pipeline`` after every stage, by ``posttrain compare``
for every method, and (its shared measurements) by the live loop's gates.

- :mod:`posttrain.evals.scoring`: pure scoring of answers (a mentioned answer, a refusal, agreement with a
  false premise), tested on hand-written strings;
- :mod:`posttrain.evals.suite`: the ``evals:`` config section and :class:`~posttrain.evals.suite.Evaluator`,
  which runs every configured measurement on one model;
- ``data/``: the built-in sets (general questions, general text, the sycophancy probe), written for posttrain.
"""
