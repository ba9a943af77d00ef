"""Kernel benchmark script: the same as `nsa-tp bench` (see ``nsa_tp.bench_cmd`` for the options).

    python benchmark/bench_kernels.py --out benchmark/results            # full run on a GPU
    python benchmark/bench_kernels.py --plot-from benchmark/results/X.json  # redraw the PNGs anywhere
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "python"))

from nsa_tp import bench_cmd  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(bench_cmd.__doc__ or "").splitlines()[0])
    bench_cmd.add_arguments(parser)
    return bench_cmd.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
