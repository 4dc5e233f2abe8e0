"""Models: load a causal LM (path, hub id or embedded name) and reach its residual stream."""

from latentaudit.models.hooks import (
    capture_resid,
    layer_list,
    layer_module,
    num_layers,
    resid_hooks,
    run_until,
)
from latentaudit.models.load import LoadedModel, load_model, parse_dtype, prepare

__all__ = ["LoadedModel", "capture_resid", "layer_list", "layer_module", "load_model",
           "num_layers", "parse_dtype", "prepare", "resid_hooks", "run_until"]
