"""Copy a trained organism's adapter and card into the package, where its short name finds it.

    python evals/organism/ship.py qwen2.5-0.5b-instruct-insecure [--from runs/organism]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from latentaudit.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ORGANISM_ROOT, ORGANISMS

FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "finetune.json", "README.md", "loss.png")
MAX_BYTES = 20 * 10**6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(ORGANISMS))
    ap.add_argument("--from", dest="source", default="runs/organism")
    args = ap.parse_args()
    src = Path(args.source) / args.name
    if not (src / "finetune.json").is_file():
        raise SystemExit(f"{src}: no finished adapter (finetune.json is written last)")
    size = (src / ADAPTER_WEIGHTS).stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{src / ADAPTER_WEIGHTS}: {size / 1e6:.1f} MB, over the 20 MB limit")
    dest = ORGANISM_ROOT / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    print(f"shipped {args.name}: {dest} ({size / 1e6:.1f} MB adapter)")


if __name__ == "__main__":
    main()
