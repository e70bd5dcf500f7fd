"""Benchmarks: `diffad bench` and the scripts that read its results (results/ holds the records).

quality.py, speed.py, load.py, overload.py   `diffad bench quality | speed | load | overload`
throughput.py       backend throughput (python -m diffad.benchmarks.throughput) and shared helpers
render_results.py   the README's results tables from results/*.json
validation_check.py, precision_check.py, score_location.py   analyses of trained runs (see each docstring)
reload_check.py     a model reload under load: every answer's status and version
"""
