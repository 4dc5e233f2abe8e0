"""The demo: :func:`~latentaudit.pipeline.driver.run_pipeline` with the shipped config
``demo/demo.toml`` (the default model and SAE, the false-belief suite, the offline default
judge), sized to finish in minutes on a laptop CPU. Its ``notes`` say what was made small and
why; they go into ``pipeline.json`` and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentaudit.pipeline.driver import PipelineResult, run_pipeline
from latentaudit.runfolder import CHECKPOINT

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_CONFIG = DEMO_DIR / "demo.toml"


SHOWN_OUT = "runs/demo"
"""The run folder of the printed config, relative to the folder the copy is saved in."""


def show_config() -> str:
    """The demo's config as ``latentaudit demo --show-config`` prints it: a copy that runs from
    any folder (the shipped completions by their absolute path, ``out`` set)."""
    lines = []
    for line in DEMO_CONFIG.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("completions = "):
            line = (f"completions = {json.dumps(str(DEMO_DIR / 'completions.jsonl'))}\n"
                    f"# The run folder, relative to this file's folder.\n"
                    f"out = {json.dumps(SHOWN_OUT)}\n")
        lines.append(line)
    return "".join(lines)


def run_demo(out: str | Path = "runs/demo", *, dry_run: bool = False) -> PipelineResult:
    """Run (or resume) the demo into ``out``. Once attribution is done its checkpoint is
    removed: the demo's options are fixed, so nothing would finish from it."""
    result = run_pipeline(DEMO_CONFIG, out=out, dry_run=dry_run)
    done = result.record.stages.get("attribute")
    if not dry_run and done is not None and done.status == "done":
        (result.run / CHECKPOINT).unlink(missing_ok=True)
    return result
