"""Benchmarks for asyncckpt (not part of the installed package, not collected by the test suite).

    python -m bench                                     # step-time benchmark, short default
    python -m bench --full                              # 1 and 2 threads, compute and Python-heavy
    python -m pytest bench/test_microbench.py --benchmark-only   # blocking save call, per size

See docs/benchmarks.md for what each figure means and the figures measured so far.
"""
