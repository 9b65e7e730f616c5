"""Benchmark: `qawatch run` against a simulator process on this machine, figures 1-11 of the
performance issue with their targets (see bench/harness.py). Not a test: the numbers depend on
the machine; run it with `make bench`.

    python bench/run.py [--only 1,2] [--quick] [--serial] [--out bench/results/latest.json]
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    # `python bench/run.py` puts bench/ on sys.path, not the repository: the harness is the
    # package `bench` (its child processes run as `python -m bench.<module>` from the repository)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.harness import main as harness_main  # noqa: PLC0415 - after the path is set

    return harness_main()


if __name__ == "__main__":
    sys.exit(main())
