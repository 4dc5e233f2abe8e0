"""The pipeline: the whole method from one config file (``latentaudit run CONFIG``), and the demo.

Modules: ``parse`` (TOML / YAML with the line of every key), ``options`` (the pipeline's own
keys), ``config`` (the checked settings of every stage), ``checks`` (every input, before any
model loads), ``records`` (``pipeline.json`` and fingerprints), ``stages`` (what each stage
reads, writes and is fingerprinted by), ``steps`` (what each stage does), ``driver`` (the
pipeline itself; its docstring gives the algorithm) and ``demo`` (the shipped config).
"""

from latentaudit.pipeline.config import RunConfig, read_config
from latentaudit.pipeline.demo import DEMO_CONFIG, run_demo
from latentaudit.pipeline.driver import (
    PipelineResult,
    StagePlan,
    plan_stages,
    run_pipeline,
)

__all__ = ["DEMO_CONFIG", "PipelineResult", "RunConfig", "StagePlan", "plan_stages",
           "read_config", "run_demo", "run_pipeline"]
