"""Tiny offline models and tokenizers built from a config, for tests (no downloads)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (259 tokens) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", *, layers: int = 2, d_model: int = 32, vocab: int = 264):
    """A small config of the given architecture family."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=layers, n_embd=d_model, n_head=4,
                                    n_positions=1024, **common)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", num_hidden_layers=layers, hidden_size=d_model,
                                    num_attention_heads=4, intermediate_size=2 * d_model,
                                    max_position_embeddings=1024, **common)
    return AutoConfig.for_model(arch, num_hidden_layers=layers, hidden_size=d_model,
                                num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=2 * d_model, max_position_embeddings=1024,
                                tie_word_embeddings=False, **common)


def tiny_model(arch: str = "llama", *, seed: int = 0, dtype=torch.float32, **kw):
    """A randomly initialised causal LM, frozen, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def save_tiny(folder: Path, arch: str = "llama", **kw) -> Path:
    """Save a tiny model + tokenizer as a Hugging Face folder (loadable by path)."""
    model = tiny_model(arch, **kw)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def random_sae(d_model: int, d_sae: int, *, seed: int = 0, activation: str = "relu", k=None,
               layer=None, mean=True):
    """A random SAE in latentaudit's canonical layout."""
    from latentaudit.saes.sae import SAE, SAEInfo

    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_model, generator=g)
    W_enc = W_dec.T.clone() * 0.5
    b_enc = torch.randn(d_sae, generator=g) * 0.1
    b_dec = torch.randn(d_model, generator=g) * 0.1
    thr = torch.rand(d_sae, generator=g) * 0.1 if activation == "jumprelu" else None
    mean_act = torch.randn(d_model, generator=g) * 0.1 if mean else None
    info = SAEInfo(activation=activation, k=k, layer=layer)
    return SAE(W_enc, b_enc, W_dec, b_dec, info=info, threshold=thr, mean_activation=mean_act)


def hook_count(model) -> int:
    """Forward hooks and pre-hooks on every module (none may be left behind)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def seen_mean_norm(model, handle, seen: list, ids) -> float:
    """Run each of ``ids`` alone through ``model`` while ``handle`` appends what a raw hook sees
    to ``seen``; remove the hook; the mean norm over every position but each sequence's first."""
    import torch

    try:
        with torch.no_grad():
            for p in ids:
                model(input_ids=torch.tensor([p]))
    finally:
        handle.remove()
    return torch.cat([h[0, 1:].norm(dim=-1) for h in seen]).mean().item()
