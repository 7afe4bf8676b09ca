"""interlace microbenchmark suite: `python -m bench --help`.

Every result is JSON with the `python -m interlace env` envelope; every table says how its numbers
were obtained. Default output goes to bench/out/ (ignored by git); measurements we publish are
written under bench/results/ by the same commands with --out.
"""
