"""``posttrain ui``: a web dashboard over what posttrain writes (runs, reports, the loop's registry and feedback).

:mod:`posttrain.ui.runs` reads run folders, :mod:`posttrain.ui.app` serves the page and its JSON; the page itself
is ``static/`` (plain JavaScript, Chart.js vendored with its licence: no network access needed).
"""
