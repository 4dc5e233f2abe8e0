"""Option errors name fields; the caller chooses how a field is named (flag or config key)."""

from __future__ import annotations

import pytest

from latentaudit.attribution.plan import saes_by_layer
from latentaudit.circuit.inputs import upstream_saes
from latentaudit.errors import LatentAuditError
from latentaudit.explain.config import ExplainConfig
from latentaudit.options import OptionError, config_key, flag
from latentaudit.steer.config import SteerConfig
from tiny import random_sae


def test_a_field_is_named_as_a_flag_or_as_a_key():
    assert flag("max_new_tokens") == "--max-new-tokens" and flag("k") == "--k"
    assert config_key("max_new_tokens") == "max_new_tokens"
    err = OptionError("skip_first",
                      "{} 7 must leave two positions of {context_len} 8, got {'a': 1}.")
    assert str(err) == "--skip-first 7 must leave two positions of --context-len 8, got {'a': 1}."
    assert err.named(config_key) == \
        "skip_first 7 must leave two positions of context_len 8, got {'a': 1}."


def test_config_checks_raise_the_field_they_are_about():
    with pytest.raises(OptionError) as err:
        ExplainConfig(skip_first=7, context_len=8)
    assert err.value.field == "skip_first"
    assert str(err.value) == "--skip-first 7 must leave at least two positions of --context-len 8."
    assert err.value.named(config_key).startswith("skip_first 7 ")
    with pytest.raises(OptionError) as err:
        SteerConfig(temperature=-1.0)
    assert str(err.value) == "--temperature must be ≥ 0 and --top-p in (0, 1]."
    assert err.value.named(config_key) == "temperature must be ≥ 0 and top_p in (0, 1]."


def test_the_layer_rule_names_the_callers_options():
    a, b = random_sae(32, 8, layer=1), random_sae(32, 8, layer=None)
    with pytest.raises(LatentAuditError, match=r"give one layer \(--layer\) per SAE \(--sae\)"):
        saes_by_layer([b], [3, 5])
    with pytest.raises(LatentAuditError, match=r"give one layer \(upstream_layer\) per SAE "
                                        r"\(upstream_sae\)"):
        saes_by_layer([b], [3, 5], fields=("upstream_layer", "upstream_sae"), name=config_key)
    with pytest.raises(LatentAuditError, match="pass --upstream-layer 1 or an SAE for layer 0"):
        upstream_saes([a], 0, 2, a)
    with pytest.raises(LatentAuditError, match=r"^upstream_layer 1 \(.*\) is not below"):
        upstream_saes([a], None, 1, a, name=config_key)
    with pytest.raises(LatentAuditError, match="^upstream_sae is missing"):
        upstream_saes([], None, 1, a, name=config_key)
