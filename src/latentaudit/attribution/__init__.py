"""Attribute a behaviour to SAE latents by gradients (METHOD.md).

Algorithm, for each hooked layer L with SAE decoder rows d_i (normalised to unit length) and a
reference mean activation ā:

1. Check the inputs before any model loads (:mod:`.plan`): validate the dataset, pair positive
   and negative completions of the same prompt and give each completion C the pair weight
   w_C = (#pairs with C positive − #pairs with C negative) / #pairs; load the SAEs and decide
   each one's layer; check every option.
2. Plan (:mod:`.plan`): tokenize the paired completions and batch them by length.
3. For each batch (:mod:`.accumulate`), one forward and one backward of ℓ_C, the mean
   cross-entropy of C's completion tokens given the prompt and the earlier completion tokens.
   Logits are computed only at the positions that predict completion tokens, parameters are frozen
   and the backward stops at the lowest hooked layer. At every position t of the sequence (or only
   the completion's, as an option) take the activation a_t and its gradient g_t = ∂ℓ_C/∂a_t.
4. Accumulate (:mod:`.accumulate`) M_raw = Σ_C w_C Σ_t g_t a_tᵀ [d_model × d_model] and
   s = Σ_C w_C Σ_t g_t, checkpointing the sums so a killed run resumes.
5. Finish (:mod:`.finish`): M = M_raw − s āᵀ = mean over pairs of (M_{C+} − M_{C−}) with ā
   subtracted (kept apart until here, so ā may be the dataset's own mean), and
   Δ-attribution_i = −d_iᵀ M d_i, which equals the mean over pairs of δ_i(C+) − δ_i(C−) with
   δ_i(C) = −Σ_t (g_t·d_i)((a_t − ā)·d_i), the first-order change of ℓ_C when latent i's
   projection is mean-ablated at every position. Positive = supports the behaviour.
   The SAE-side cost is one contraction, independent of the number of completions.
6. Δ-activation_i (the baseline): mean SAE activation of latent i over the positive completions'
   tokens minus over the negative completions' tokens.
7. Rank the top latents of each layer by Δ-attribution and read their logit lens.
   :func:`~latentaudit.attribution.output.write_run` then writes the result.

Reference: T. Dupre la Tour and D. Mossing, "Debugging misaligned completions with
sparse-autoencoder latent attribution" (OpenAI, 2025).
"""

from latentaudit.attribution.config import (
    AttributionConfig,
    AttributionResult,
    LayerAttribution,
    ModelSummary,
    RankedLatent,
)
from latentaudit.attribution.engine import attribute

__all__ = ["AttributionConfig", "AttributionResult", "LayerAttribution", "ModelSummary",
           "RankedLatent", "attribute"]
