"""Runs the interop suite (unittest discovery in this folder).

Usage: python tests/interop/run.py [-v] [-k PATTERN ...]

The last line printed is `N passed, N failed` (CI reads it); skipped tests are reported on
the line before it. Exit status 0 only when nothing failed and at least one test passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


class Result(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.passed = 0
        self._t0 = 0.0

    def startTest(self, test):
        self._t0 = time.monotonic()
        super().startTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-k", action="append", dest="patterns", default=None,
                    help="only tests whose name contains this substring (unittest -k)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from fedmcp_harness import binary

    if not os.access(binary(), os.X_OK):
        print(f"interop: no executable fedmcp at {binary()} (build it, or set FEDMCP_BIN)")
        print("0 passed, 1 failed", flush=True)
        return 1
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in args.patterns]
    suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if args.verbose else 1,
                                     resultclass=Result)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    if result.skipped:
        print(f"{len(result.skipped)} skipped:")
        for test, why in result.skipped:
            print(f"  {test.id()}: {why}")
    sys.stdout.flush()
    print(f"{result.passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 and result.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
