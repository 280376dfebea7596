"""Side-by-side benchmarks of beanie-tasks, its MongoDB peers and a raw-driver floor.

Run ``python -m bench`` (or ``make bench``); ``--quick`` for a smaller run. Results go
to ``bench/results/latest.md`` and ``bench/results/latest.png``. These are
measurements, not tests: nothing here asserts a timing.
"""
