"""The fuzz tests' long mode: 10^5 inputs at the tracker, HTTP and agent doors.

    python -m loadtest.bench_fuzz [--examples 7000]

Runs tests/test_fuzz.py with ``FUZZ_EXAMPLES`` examples per test (the suite
runs a short mode) and prints how many inputs each door received. Every
check of the short mode applies: hub alive, no 500, nothing logged as an
exception, the index equal to the model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--examples", type=int, default=9500, help="hypothesis examples per test")
    args = parser.parse_args()
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples)}
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "--timeout",
            "0",
            "tests/test_fuzz.py",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - started
    match = re.search(r"fuzz inputs: (\{.*\})", proc.stdout)
    if proc.returncode != 0 or match is None:
        log = os.path.abspath("bench_fuzz.log")
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
        print(f"full output: {log}")
        # The failing example and its error, not the captured log lines around them.
        wanted = re.compile(r"^(E |FAILED|\s*\| .*(Error|Failing test case|batch=))")
        print("\n".join(line[:2000] for line in proc.stdout.splitlines() if wanted.match(line)))
        print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:])
        return 1
    inputs = json.loads(match.group(1))
    total = sum(inputs.values())
    summary = proc.stdout.strip().splitlines()[-1]
    print(f"{summary}; {total} inputs in {elapsed:.0f} s: {json.dumps(inputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
