"""Rewards of the reward-hacking example (user code: posttrain runs it in a sandboxed worker subprocess).

``brevity`` is the optimised reward and nothing else: shorter is better, whatever is said. This is the seed's
example of a misspecified reward ("a summariser rewarded for brevity learns to write short, useless summaries").

``informative`` is the held-out guard: the share of the source's key facts (the row's ``keywords`` column) that
the summary keeps. The policy never sees it; posttrain scores it on held-out prompts and stops the run when it
falls.
"""


def brevity(prompt, completion, **row):
    """1 for an empty answer, 0 for 60 words or more, linear in between."""
    words = len(completion.split())
    return max(0.0, 1.0 - words / 60.0)


def informative(prompt, completion, keywords=(), **row):
    """Share of the key facts that appear in the summary (case-insensitive)."""
    if not keywords:
        return 0.0
    text = completion.casefold()
    return sum(k.casefold() in text for k in keywords) / len(keywords)
