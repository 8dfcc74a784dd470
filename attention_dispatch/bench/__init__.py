"""``attention-dispatch bench``: every backend on this machine, side by side.

Correctness against the float64 reference, timing, TFLOP/s, peak memory,
first-call latency, and the ratio auto / best for every case.  See docs/bench.md.
"""
