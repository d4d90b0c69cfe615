# Copyright 2026 The trl_vaopd authors. Licensed under the Apache License, Version 2.0.
"""
Wall time of the built-in demo as a new user meets it: `python examples/train_vaopd.py` with no argument, from an
empty model cache (so the teacher and student are trained), then once more with the cache filled.

Each run is a fresh Python process (imports included) with `TRL_VAOPD_CACHE` pointing at a temporary directory; the
machine's load average is recorded before each run, since other processes on the same cores slow the demo down.

```bash
python examples/time_demo.py                       # both runs, results in demo_walltime.json
python examples/time_demo.py --command -m trl_vaopd.demo --no_progress
```
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def timed_run(command: list[str], cache: str, output_dir: str) -> dict:
    env = {**os.environ, "TRL_VAOPD_CACHE": cache, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=output_dir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"{' '.join(command)} failed with exit code {completed.returncode}")
    summary = next(
        (completed.stdout[i:] for i in [completed.stdout.find("VA-OPD demo")] if i >= 0),
        completed.stdout[-2000:],
    )
    return {"seconds": round(seconds, 1), "load_average_before": load_before, "summary": summary.strip()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Time the built-in demo from an empty cache, then from the cache.")
    parser.add_argument(
        "--command",
        nargs=argparse.REMAINDER,
        default=None,
        help="Python arguments to time (default: examples/train_vaopd.py with no argument)",
    )
    parser.add_argument("--output", default="demo_walltime.json")
    args = parser.parse_args(argv)
    default = ROOT / "examples" / "train_vaopd.py"
    if args.command:
        command = [sys.executable, *args.command]
    elif "run_demo" in default.read_text():
        command = [sys.executable, str(default)]
    else:
        print("examples/train_vaopd.py does not run the demo by default here; timing `python -m trl_vaopd.demo`")
        command = [sys.executable, "-m", "trl_vaopd.demo"]
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as workdir:
        print(f"Timing {' '.join(command)} with an empty cache ...", flush=True)
        fresh = timed_run(command, cache, workdir)
        print(f"  {fresh['seconds']:.0f}s", flush=True)
        print("... and again with the teacher and student cached", flush=True)
        cached = timed_run(command, cache, workdir)
        print(f"  {cached['seconds']:.0f}s", flush=True)
    result = {
        "command": " ".join(command[1:]),
        "fresh_cache": fresh,
        "warm_cache": cached,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(fresh["summary"])
    print(f"\nWall time from an empty cache: {fresh['seconds']:.0f}s; with the cache: {cached['seconds']:.0f}s")
    print(f"Wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
