"""Steering: the half of the method that proves or refutes a cause (METHOD.md, "Checking
causality by steering"). See :mod:`latentaudit.steer.sweep` for the algorithm.

Modules: ``config`` (the sweep's settings and conditions), ``latents`` (latent sets and held-out
prompts from an attribution run), ``vectors`` (steering vectors and the residual norm),
``generation`` (resumable batched steered sampling), ``logodds`` (the first-token check),
``search`` (per-latent strength search), ``grade`` (judging and the table), ``stats``
(bootstrap intervals), ``diff`` (the model-diffing baseline), ``figures``, ``sweep`` (the driver).
"""

from latentaudit.steer.config import Condition, SteerConfig
from latentaudit.steer.sweep import SteerPlan, SteerResult, plan_steering, run_steering

__all__ = ["Condition", "SteerConfig", "SteerPlan", "SteerResult", "plan_steering",
           "run_steering", "steer_latents"]


def steer_latents(cfg: SteerConfig | None = None, *, model=None, device: str = "auto",
          dtype: str = "float32", **plan_args) -> SteerResult:
    """Plan and run a steering sweep: ``plan_args`` as for :func:`plan_steering` (``run``,
    ``latents``, ``prompts``, ``rubric``, ``judge``, ``out``, ...); ``model`` may be a
    LoadedModel already in memory."""
    if model is not None and not isinstance(model, str):
        plan_args.setdefault("model", model.name)
    elif isinstance(model, str):
        plan_args.setdefault("model", model)
        model = None
    plan = plan_steering(cfg or SteerConfig(), **plan_args)
    return run_steering(plan, model, device=device, dtype=dtype)
