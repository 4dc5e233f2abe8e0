"""Latent circuits: attribute the top latents of one layer to the latents of earlier layers.

Algorithm, for SAEs at layers L1 < L2 (unit decoder rows d_j at L1, d_i at L2; ā at L1) and target
latents i at L2 (the top ``top_k`` of an attribution run's ranking, or given ids):

1. Check every input before the model loads (:mod:`.inputs`): the run folder, its target layer
   and targets, the run's SAE and dataset (paired as the run paired them), the upstream SAEs and
   their layers, the options.
2. For each batch of the run's paired completions (:mod:`.passes`), one forward and one
   backward of ℓ_C as attribution does, giving a¹_t at the upstream SAE's hook point of L1 and,
   at the target SAE's hook point of L2, a²_t and g²_t = ∂ℓ_C/∂a²_t (each point is the one its
   SAE reads: resid_post, resid_pre, attn_out or mlp_out; every point of L1 lies upstream of
   every point of L2, so the steps below hold at any pair).
3. The target's measure y_i and its cotangent at L2 (:mod:`.math`): ``loss``, the target's
   contribution to the loss, y_i = Σ_t (g²_t·d_i)((a²_t − ā²)·d_i) = −δ_i(C) with g² held at its
   clean value, cotangent (g²_t·d_i) d_i; or ``pre-activation``, the SAE encoder's
   pre-activation of i summed over the completion's tokens.
4. One vector-Jacobian product per target from L2 down to L1, u^(i)_t = ∂y_i/∂a¹_t, the targets
   stacked in the batch dimension of a replay of the layers between (one backward per
   ``target_batch`` targets; checked against the clean a², one backward per target otherwise).
   On the CPU the ``auto`` route takes one backward per target through the clean pass: stacking
   buys no parallelism there, and the replay's forward would be extra work.
5. The edge from upstream latent j to target i on completion C, the mean-ablation first-order
   form of METHOD.md one level down:

       e_{j→i}(C) = Σ_t −(u^(i)_t·d_j)((a¹_t − ā)·d_j) = −d_jᵀ M^(i)_C d_j,
       M^(i)_C = Σ_t u^(i)_t (a¹_t − ā)ᵀ

   so per target only a d_model × d_model moment matrix is accumulated (weighted by the pair
   weights w_C, ā subtracted at the end, as attribution does) and contracted with every upstream
   decoder row once: the cost is K backward passes from L2 to L1, not K × d_sae. Δ-edge_{j→i} =
   mean over pairs of e_{j→i}(C+) − e_{j→i}(C−). With ``loss`` an edge is in δ's units: > 0 means
   that j, through i, supports the behaviour-showing completions more than the others; over a
   complete orthonormal set of targets (positions ``all``) the edges out of j add up to j's own
   δ_j. The same passes give every upstream latent's own Δ-attribution.
6. Prune (:func:`.math.prune_edges`): per target, the fewest strongest edges that hold
   ``fraction`` of its total |Δ-edge|, at most ``max_edges``. Chains (L1 < L2 < L3): the
   ``top_k`` upstream latents with the most kept edge weight become the targets of the next hop
   down (:func:`.math.next_targets`), one pass per hop.
7. Label the nodes (:mod:`.labels`: logit lens, top-activating examples from explain's cache) and
   write the files below (:mod:`.output`), each atomically; a killed pass resumes from its
   per-hop checkpoint.

Files in ``<run>/circuit/`` (schema_version 1):

- ``circuit.json``: ``schema_version``, ``stage`` ("circuit"), ``run``, ``model``, ``measure``,
  ``positions``, ``layers``, ``hops`` ([{upstream_layer, target_layer, upstream_sae,
  upstream_hook and target_hook (where either is not resid_post), targets, route, abar_source,
  edges_kept, kept_share}]), ``nodes``
  ([{id "layer:latent", layer, latent, role (target, intermediate, upstream), rank,
  delta_attribution, attribution_total, attribution_kept, logit_lens, top_examples
  ([{activation, max_index, tokens, activations}] or null when not cached)}]), ``edges``
  ([{source, target, weight (Δ-edge), share (|weight| over the target's total)}]),
  ``dataset``, ``counts``, ``options`` and ``versions``.
- ``circuit.safetensors``: per hop ``L{L1}_L{L2}``: float32 ``edges_…`` [targets, d_sae] (every
  Δ-edge, unpruned), int64 ``targets_…``, float32 ``upstream_delta_…`` [d_sae] and ``a_bar_…``.
"""

from latentaudit.circuit.config import CircuitConfig, CircuitResult, Hop
from latentaudit.circuit.engine import trace_circuit

__all__ = ["CircuitConfig", "CircuitResult", "Hop", "trace_circuit"]
