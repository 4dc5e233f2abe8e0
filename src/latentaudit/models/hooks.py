"""The one hook mechanism: plain torch forward hooks on a Hugging Face model's decoder layers.

Hook point ``resid_post`` of layer L (0-indexed) is the output of decoder layer L, i.e. Hugging
Face ``hidden_states[L + 1]`` and SAELens ``blocks.L.hook_resid_post``. Decoder layers are found
generically as the ``ModuleList`` whose length is ``num_hidden_layers``; :data:`LAYER_PATHS` lists
the architectures where that search needs help. Every context manager here removes exactly the
handles it registered, in ``finally``.

Other hook points of layer L (SAELens ``blocks.L.hook_<point>``) are found by :func:`hook_site`,
the one place that knows them: ``resid_pre`` (the layer's input hidden state), ``attn_out`` and
``mlp_out`` (what the attention and the MLP add to the residual stream: their output, after the
post-norm of Gemma-2-style blocks), ``mlp_in`` (what the MLP reads: its module's input, after
the pre-MLP norm; a transcoder's encoder reads it). ``resid_mid``, the residual stream between
the attention and the MLP, is no module's output: it is resid_pre + attn_out, so its hook records
the layer's input and, at the attention's output o, sees h = resid_pre + o and hands back
h' − resid_pre, which makes the residual stream h' from there on (blocks whose attention and
MLP read the same input, :data:`PARALLEL`, have no resid_mid). Every hook below takes ``point``
(one for all layers, or {layer: point}); a hook function sees and may replace the activation at
that point.

Steering (:class:`RowSteering`, :func:`steer_resid`) is one more residual hook: row b of the
batch gets ``vectors[b]`` added at every position of every forward pass (a prefill over the
prompt, then one decoding step per new token with the KV cache), so one batch can carry a
different steering condition per row. :meth:`RowSteering.select` follows the batch when
finished rows leave the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from latentaudit.errors import LatentAuditError
from latentaudit.options import OptionError

# model_type -> dotted path of the decoder-layer ModuleList, where the generic search is
# ambiguous or fails (several lists of that length, or layers nested in a wrapper).
LAYER_PATHS: dict[str, str] = {
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "gptj": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "opt": "model.decoder.layers",
    "mpt": "transformer.blocks",
}

ResidFn = Callable[[Tensor], Tensor | None]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (nothing above the layer runs)."""


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers from the model's (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise LatentAuditError(
        f"Cannot tell how many layers {type(model).__name__} has from its config.")


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer ``ModuleList`` (table first, then the generic length search)."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in LAYER_PATHS:
        with contextlib.suppress(AttributeError):
            return model.get_submodule(LAYER_PATHS[model_type])
    n = num_layers(model)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise LatentAuditError(
            f"Found no list of {n} decoder layers in {type(model).__name__}; add its model_type "
            f"'{model_type}' to latentaudit.models.hooks.LAYER_PATHS.")
    return min(found, key=lambda nm: nm[0].count("."))[1]  # outermost wins


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    """Decoder layer ``layer`` (0-indexed), with a clear error when out of range."""
    layers = layer_list(model)
    if not 0 <= layer < len(layers):
        raise OptionError(
            "layer", f"{{}} {layer} is out of range: the model has layers 0..{len(layers) - 1}.")
    return layers[layer]


def layer_device(model: nn.Module, layer: int) -> torch.device:
    """The device decoder layer ``layer`` computes on: where its output, and so anything that
    works on it (an SAE, a steering vector, attribution sums), lives. With a model spread over
    devices (``device_map``) that is the layer's execution device, which may differ from the
    device of the inputs."""
    module = layer_module(model, layer)
    hook = getattr(module, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution)
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return next(model.parameters()).device
    return param.device


POINTS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
"""Hook points of a decoder layer, in the order the forward pass reaches them."""
PARALLEL: dict[str, str | None] = {"gpt_neox": "use_parallel_residual", "gptj": None,
                                   "falcon": "parallel_attn", "phi": None, "cohere": None,
                                   "cohere2": None}
"""model_type -> the config flag that makes its blocks parallel (attention and MLP both read the
layer's input), or None where they always are: these blocks have no resid_mid."""
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")


def hook_site(model: nn.Module, layer: int, point: str = "resid_post") -> tuple[nn.Module, bool]:
    """(module, is_input) of hook point ``point`` of decoder layer ``layer``: the activation is
    that module's output, or, for ``resid_pre``, its input hidden state."""
    block = layer_module(model, layer)
    if point in ("resid_post", "resid_pre"):
        return block, point == "resid_pre"
    gemma_style = hasattr(block, "pre_feedforward_layernorm")  # post-norms on both branches
    if point == "attn_out" and gemma_style and hasattr(block, "post_attention_layernorm"):
        return block.post_attention_layernorm, False
    if point == "mlp_out" and hasattr(block, "post_feedforward_layernorm"):
        return block.post_feedforward_layernorm, False
    for name in {"attn_out": _ATTN, "mlp_out": _MLP, "mlp_in": _MLP}.get(point, ()):
        if isinstance(getattr(block, name, None), nn.Module):
            return getattr(block, name), point == "mlp_in"
    if point not in POINTS:
        raise LatentAuditError(f"hook point '{point}' is not one of {', '.join(POINTS)}.")
    raise LatentAuditError(
        f"decoder layer {layer} ({type(block).__name__}) has no module for hook point "
        f"'{point}': latentaudit looks for {', '.join({'attn_out': _ATTN}.get(point, _MLP))}.")


def _point_of(point: str | Mapping[int, str], layer: int) -> str:
    return point if isinstance(point, str) else point.get(layer, "resid_post")


def _resid_hook(fn: ResidFn) -> Callable:
    """Wrap ``fn(hidden) -> new hidden | None`` as a forward hook (on the module's output)."""

    def hook(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def _input_hook(fn: ResidFn) -> Callable:
    """Wrap ``fn`` as a forward pre-hook on a decoder layer's input hidden state."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        new = fn(hidden)
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    return hook


def parallel_blocks(model: nn.Module) -> bool:
    """Whether the model's attention and MLP read the same input (see :data:`PARALLEL`)."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    if model_type not in PARALLEL:
        return False
    flag = PARALLEL[model_type]
    return flag is None or bool(getattr(cfg, flag, False)) or (
        model_type == "falcon" and bool(getattr(cfg, "new_decoder_architecture", False)))


def _mid_hooks(model: nn.Module, layer: int, fn: ResidFn) -> list:
    """resid_mid of ``layer``: the layer's input recorded by a pre-hook, then resid_pre + o seen
    at the attention's output o (step in the module docstring)."""
    if parallel_blocks(model):
        raise LatentAuditError(
            f"hook point 'resid_mid' does not exist in {type(model).__name__}: its attention "
            "and MLP both read the layer's input (parallel blocks); use resid_pre, attn_out, "
            "mlp_out or resid_post.")
    block = layer_module(model, layer)
    attn, _ = hook_site(model, layer, "attn_out")
    pre: list[Tensor] = []

    def record(hidden: Tensor) -> None:
        pre[:] = [hidden]

    def mid(out: Tensor) -> Tensor | None:
        h = pre[0] + out  # (B, T, D)
        new = fn(h)
        if new is None:
            # observed only: keep the forward exact, unless a gradient must reach h
            return h - pre[0] if torch.is_grad_enabled() and h.requires_grad else None
        return new - pre[0]

    return [block.register_forward_pre_hook(_input_hook(record), with_kwargs=True),
            attn.register_forward_hook(_resid_hook(mid))]


@contextlib.contextmanager
def resid_hooks(model: nn.Module, fns: dict[int, ResidFn],
                point: str | Mapping[int, str] = "resid_post") -> Iterator[None]:
    """Run ``fns[L](hidden)`` on hook point ``point`` of decoder layer L (resid_post: the
    layer's output); a returned tensor replaces it."""
    handles = []
    try:
        for layer, fn in fns.items():
            where = _point_of(point, layer)
            if where == "resid_mid":
                handles.extend(_mid_hooks(model, layer, fn))
                continue
            module, is_input = hook_site(model, layer, where)
            handles.append(
                module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True) if is_input
                else module.register_forward_hook(_resid_hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_resid(model: nn.Module, layers: Sequence[int], *, stop_after: bool = False,
                  grad_from: int | None = None, point: str | Mapping[int, str] = "resid_post"
                  ) -> Iterator[dict[int, Tensor]]:
    """Capture ``point`` (default resid_post) of ``layers`` into the yielded dict (filled during
    the forward).

    ``stop_after``: raise :class:`StopForward` after the highest layer (use with
    :func:`run_until`). ``grad_from``: at that layer, replace the output by a detached leaf that
    requires grad, so a backward pass stops there and its gradient is available.
    """
    store: dict[int, Tensor] = {}
    top = max(layers)

    def make(layer: int) -> ResidFn:
        def fn(hidden: Tensor) -> Tensor | None:
            out = None
            if layer == grad_from:
                hidden = out = hidden.detach().requires_grad_(True)
            store[layer] = hidden
            if stop_after and layer == top:
                raise StopForward
            return out
        return fn

    with resid_hooks(model, {layer: make(layer) for layer in sorted(set(layers))}, point):
        yield store


def run_until(model: nn.Module, layers: Sequence[int],
              point: str | Mapping[int, str] = "resid_post", **inputs) -> dict[int, Tensor]:
    """Forward only up to the highest of ``layers`` and return their activations at ``point``
    (default resid_post)."""
    with capture_resid(model, layers, stop_after=True, point=point) as store, torch.no_grad():
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
    return dict(store)


@contextlib.contextmanager
def capture_layer_inputs(model: nn.Module, layers: Sequence[int]
                         ) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Record the (args, kwargs) each of ``layers`` is called with into the yielded dict.

    A decoder layer's call carries what the model prepared for it (attention mask, rotary
    position embeddings, position ids), whatever the architecture; replaying the calls with a new
    hidden state runs only the layers above a hook point (:mod:`latentaudit.models.upper`).
    """
    calls: dict[int, tuple[tuple, dict]] = {}

    def make(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            calls[layer] = (args, dict(kwargs))
        return hook

    handles = []
    try:
        for layer in sorted(set(layers)):
            handles.append(layer_module(model, layer).register_forward_pre_hook(
                make(layer), with_kwargs=True))
        yield calls
    finally:
        for h in handles:
            h.remove()


class RowSteering:
    """Per-row vectors added to hook point ``point`` (default resid_post) of one layer:
    ``vectors[b]`` goes to every position of batch row b. ``select(rows)`` keeps the rows still
    generating, in cache order."""

    def __init__(self, layer: int, vectors: Float[Tensor, "batch d_model"],
                 point: str = "resid_post"):
        self.layer = layer
        self.vectors = vectors
        self.point = point

    def select(self, rows: Sequence[int] | Tensor) -> None:
        self.vectors = self.vectors[torch.as_tensor(rows, device=self.vectors.device)]

    def add(self, hidden: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if hidden.shape[0] != self.vectors.shape[0]:
            raise LatentAuditError(
                f"steering holds {self.vectors.shape[0]} row(s) but the layer saw a batch of "
                f"{hidden.shape[0]}; give one vector per batch row.")
        return hidden + self.vectors.to(hidden.device, hidden.dtype)[:, None, :]


@contextlib.contextmanager
def steer_resid(model: nn.Module, steering: RowSteering | None) -> Iterator[None]:
    """Add ``steering``'s per-row vectors to its layer's output while the context is open
    (nothing when ``steering`` is None)."""
    if steering is None:
        yield
        return
    with resid_hooks(model, {steering.layer: steering.add}, steering.point):
        yield
