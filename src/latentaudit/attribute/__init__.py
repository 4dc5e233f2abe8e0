"""Attribute a behaviour to SAE latents by gradients (METHOD.md).

Algorithm, for each hooked layer L with SAE decoder rows d_i (normalised to unit length) and a
reference mean activation ā:

1. For each completion C, one forward and one backward of ℓ_C, the mean cross-entropy of C's
   completion tokens given the prompt and the earlier completion tokens. Logits are computed only
   at the positions that predict completion tokens, parameters are frozen and the backward stops at
   the lowest hooked layer.
2. At every position t of the sequence (or only the completion's, as an option) take the
   activation a_t and its gradient g_t = ∂ℓ_C/∂a_t.
3. Accumulate the moment matrix M = Σ_C w_C Σ_t g_t (a_t − ā)ᵀ  [d_model × d_model], where the pair
   weight w_C = (#pairs with C positive − #pairs with C negative) / #pairs makes
   M = mean over pairs of (M_{C+} − M_{C−}). M_raw = Σ w g aᵀ and s = Σ w g are kept apart and
   M = M_raw − s āᵀ is formed at the end, so ā may be the dataset's own mean.
4. Δ-attribution_i = −d_iᵀ M d_i, which equals the mean over pairs of δ_i(C+) − δ_i(C−) with
   δ_i(C) = −Σ_t (g_t·d_i)((a_t − ā)·d_i), the first-order change of ℓ_C when latent i's
   projection is mean-ablated at every position. Positive = supports the behaviour.
   The SAE-side cost is one contraction, independent of the number of completions.
5. Δ-activation_i (the baseline): mean SAE activation of latent i over the positive completions'
   tokens minus over the negative completions' tokens.

Reference: T. Dupre la Tour and D. Mossing, "Debugging misaligned completions with
sparse-autoencoder latent attribution" (OpenAI, 2025).
"""

from latentaudit.attribute.config import (
    AttributionConfig,
    AttributionResult,
    LayerAttribution,
)
from latentaudit.attribute.engine import attribute

__all__ = ["AttributionConfig", "AttributionResult", "LayerAttribution", "attribute"]
