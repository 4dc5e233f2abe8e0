"""The peak memory of a whole `latentaudit run` (by default the demo's config) against the model's
weights, stage by stage.

1. Write the run config (``latentaudit demo --show-config`` unless ``--config`` is given) with
   its run folder in a temporary folder, so every stage runs from the start.
2. Run it in a child process; every 50 ms read the child's resident set (``VmRSS`` in
   ``/proc/PID/status``) and credit it to the stage whose start the log last announced.
3. Print per stage the resident set when it started and its peak, then the run's peak against
   the model's weights (the float32 safetensors of the embedded model's cache, or
   ``--weights-gib``), and whether it is within the bound (1.5×).

Linux only (it reads /proc). Usage:
    python benchmarks/bench_demo_memory.py [--config run.toml] [--weights-gib 2.35] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BOUND = 1.5
STAGE = re.compile(r"stage (\w+): (run|resume)")


def resident_gib(pid: int) -> float:
    """The resident set of process ``pid`` in GiB (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def weights_gib(model: str) -> float:
    """The size of the embedded model's cached float32 weights, in GiB."""
    from latentaudit.models.embedded import cache_dir

    files = list(cache_dir(model).glob("*.safetensors"))
    if not files:
        sys.exit(f"no cached weights of {model}: run `latentaudit demo` once, or give "
                 "--weights-gib")
    return sum(f.stat().st_size for f in files) / 2**30


def watch(cmd: list[str]) -> tuple[list[tuple[str, float, float]], int]:
    """Steps 2: run ``cmd``; per stage (name, resident set at its start, its peak)."""
    child = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stages: list[list] = [["start", 0.0, 0.0]]
    tail: list[str] = []

    def read() -> None:
        for line in child.stderr:
            tail[:] = (tail + [line])[-20:]
            if m := STAGE.search(line):
                now = resident_gib(child.pid)
                stages.append([m[1], now, now])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while child.poll() is None:
        stages[-1][2] = max(stages[-1][2], resident_gib(child.pid))
        time.sleep(0.05)
    reader.join(timeout=5)
    if child.returncode:
        sys.stderr.write("".join(tail))
    return [tuple(s) for s in stages], child.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="a run config (default: the demo's)")
    ap.add_argument("--weights-gib", type=float, help="the model's weights in GiB (default: "
                    "the embedded model's cached safetensors)")
    ap.add_argument("--keep", type=Path, help="write the run folder here instead of a "
                    "temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "run"
        config = Path(tmp) / "run.toml"
        text = (args.config.read_text() if args.config else subprocess.run(
            [sys.executable, "-m", "latentaudit", "demo", "--show-config"], check=True,
            capture_output=True, text=True).stdout)
        config.write_text(text)
        if args.config:  # the config's relative inputs are read from its own folder
            config = args.config
        model = re.search(r'^model\s*=\s*"([^"]+)"', text, re.M)[1]
        weights = args.weights_gib or weights_gib(model)
        start = time.perf_counter()
        stages, rc = watch([sys.executable, "-m", "latentaudit", "run", str(config),
                            "--out", str(out)])
        seconds = time.perf_counter() - start
    if rc:
        sys.exit(f"the run failed (exit {rc})")
    print(f"model {model}: {weights:.2f} GiB of weights; the run took {seconds:.0f} s\n")
    print(f"{'stage':<10} {'at start':>9} {'peak':>9} {'peak / weights':>15}")
    for name, at_start, peak in stages:
        print(f"{name:<10} {at_start:>7.2f} G {peak:>7.2f} G {peak / weights:>14.2f}x")
    top = max(peak for _, _, peak in stages)
    print(f"\npeak resident set of the run: {top:.2f} GiB = {top / weights:.2f}x the model's "
          f"weights ({'within' if top <= BOUND * weights else 'above'} the {BOUND}x bound)")


if __name__ == "__main__":
    main()
