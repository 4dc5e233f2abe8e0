"""The demo: :func:`~latentaudit.pipeline.driver.run_pipeline` with the shipped config
``demo/demo.toml`` (the default model and SAE, the false-belief suite, the offline default
judge), sized to finish in minutes on a laptop CPU. Its ``notes`` say what was made small and
why; they go into ``pipeline.json`` and the report.
"""

from __future__ import annotations

from pathlib import Path

from latentaudit.pipeline.driver import PipelineResult, run_pipeline

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_CONFIG = DEMO_DIR / "demo.toml"


def run_demo(out: str | Path = "runs/demo", *, dry_run: bool = False) -> PipelineResult:
    """Run (or resume) the demo into ``out``."""
    return run_pipeline(DEMO_CONFIG, out=out, dry_run=dry_run)
