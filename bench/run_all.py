"""`make bench`: run every bench/bench_*.py in turn, each bounded in time, and list results."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if len(sys.argv) > 1:
        scripts = [s for s in scripts if any(word in s.name for word in sys.argv[1:])]
    failed = []
    for i, script in enumerate(scripts, 1):
        print(f"\n=== [{i}/{len(scripts)}] {script.name} ===", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run([sys.executable, str(script)], cwd=HERE.parent,
                                  timeout=900).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        print(f"=== {script.name}: exit {code} after {time.monotonic() - started:.0f} s ===",
              flush=True)
        if code != 0:
            failed.append(script.name)
    print(f"\nresults in {HERE / 'results'}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
