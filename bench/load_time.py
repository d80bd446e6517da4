"""Load time of the default model: first load (GGUF → dequantized folder) and cached load.

    python bench/load_time.py            # uses a fresh temporary RATEQ_CACHE for the first load
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CHILD = "import time, rateq; t = time.perf_counter(); rateq.load_model(); print(time.perf_counter() - t)"


def timed_load(cache: str) -> float:
    env = dict(os.environ, RATEQ_CACHE=cache, TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(cache)
        cached = timed_load(cache)
    print("| load | seconds |\n| --- | --- |")
    print(f"| first (convert GGUF, write cache) | {first:.1f} |")
    print(f"| cached | {cached:.1f} |")
    print(f"ratio first/cached: {first / cached:.1f}x")


if __name__ == "__main__":
    main()
