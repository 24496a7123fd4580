"""Calibration benchmarks: covariance kernel and randomized SVD (see loranull_kernels/bench/calibration.py).

    python benchmarks/bench_calibration.py [--quick] [--only covariance rsvd batched]
"""
import sys

from loranull_kernels.bench.calibration import main

if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
