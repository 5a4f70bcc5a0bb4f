"""Grouping specs: how trainable parameters are partitioned into clipping groups, thresholds, and their errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from groupclip import AttachError, ClippingEngine, GroupingError, resolve_grouping
from groupclip.grouping import balanced_contiguous_split


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


class OutOfOrder(nn.Module):
    """Registered a, b, c -- but forward runs b, then a, then c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)  # 36
        self.b = nn.Linear(4, 6, bias=False)  # 24
        self.c = nn.Linear(6, 2)  # 12 + 2

    def forward(self, x):
        return self.c(torch.tanh(self.a(torch.tanh(self.b(x)))))


class Tied(nn.Module):
    """An embedding whose weight is shared with an output head (registered names emb.weight and head.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(4))  # a raw parameter of the root module

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))) * self.scale)


# ---------------------------------------------------------------------- named specs
def test_all_layer():
    model = mlp()
    g = resolve_grouping(model, "all-layer")
    assert g.groups == {"all": ("0.weight", "0.bias", "2.weight", "2.bias")}


def test_layer_wise_one_group_per_owning_module():
    model = mlp()
    assert resolve_grouping(model, "layer-wise").groups == {"0": ("0.weight", "0.bias"), "2": ("2.weight", "2.bias")}


def test_layer_wise_shared_parameter_and_root_parameters():
    g = resolve_grouping(Tied(), "layer-wise").groups
    # The tied weight appears once, under its first (canonical) owner; the head keeps only its bias.
    assert g == {
        "<root>": ("scale",),
        "emb": ("emb.weight",),
        "mid": ("mid.weight", "mid.bias"),
        "head": ("head.bias",),
    }


def test_param_wise():
    model = mlp()
    g = resolve_grouping(model, "param-wise").groups
    assert g == {n: (n,) for n in ("0.weight", "0.bias", "2.weight", "2.bias")}


def test_per_device_single_device():
    assert resolve_grouping(mlp(), "per-device").groups == {"cpu": ("0.weight", "0.bias", "2.weight", "2.bias")}


def test_unknown_named_spec_lists_choices():
    with pytest.raises(GroupingError, match=r"'layerwise'.*all-layer.*layer-wise"):
        resolve_grouping(mlp(), "layerwise")


@pytest.mark.parametrize("spec", [True, 1.5, None])
def test_malformed_spec(spec):
    with pytest.raises(GroupingError, match="Unknown grouping"):
        resolve_grouping(mlp(), spec)


# ---------------------------------------------------------------------- int M: execution order, balance
def test_int_needs_execution_order():
    with pytest.raises(GroupingError, match="execution order"):
        resolve_grouping(mlp(), 2)


def test_int_blocks_follow_execution_order_not_registration():
    model = OutOfOrder()
    registration = [n for n, _ in model.named_parameters()]
    assert registration == ["a.weight", "b.weight", "c.weight", "c.bias"]
    engine = ClippingEngine(model, grouping=4)
    assert engine.grouping is None
    with engine:
        resolved = engine.resolve_grouping(torch.randn(3, 4))
    assert list(resolved.groups.values()) == [("b.weight",), ("a.weight",), ("c.weight",), ("c.bias",)]
    assert list(resolved.groups) == ["block0", "block1", "block2", "block3"]


def test_int_resolution_needs_attach():
    engine = ClippingEngine(OutOfOrder(), grouping=2)
    with pytest.raises(AttachError, match="Attach"):
        engine.resolve_grouping(torch.randn(3, 4))


def test_int_two_blocks_balanced_in_execution_order():
    # Execution order sizes [24 (b), 36 (a), 12, 2]: the best 2-split is [24] | [36, 12, 2] (max 50);
    # in registration order [36, 24, 12, 2] it would have been [36] | [24, 12, 2].
    model = OutOfOrder()
    engine = ClippingEngine(model, grouping=2)
    with engine:
        model(torch.randn(3, 4)).sum().backward()  # the first forward pass resolves it
    assert engine.grouping.groups == {"block0": ("b.weight",), "block1": ("a.weight", "c.weight", "c.bias")}
    assert set(engine.last_report.per_sample_norms) == {"block0", "block1"}


def test_int_unused_parameters_go_last_in_registration_order():
    model = mlp()
    g = resolve_grouping(model, 4, execution_order=["2.weight", "0.weight"])
    assert list(g.groups.values()) == [("2.weight",), ("0.weight",), ("0.bias",), ("2.bias",)]


def _best_max(sizes, parts):
    best = math.inf
    for cuts in itertools.combinations(range(1, len(sizes)), parts - 1):
        bounds = [0, *cuts, len(sizes)]
        best = min(best, max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_balanced_contiguous_split_is_optimal_and_nonempty():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        sizes = [rng.choice([1, 2, 3, 10, 50, 400]) for _ in range(n)]
        parts = rng.randint(1, n)
        cuts = balanced_contiguous_split(sizes, parts)
        bounds = [0, *cuts, n]
        assert len(bounds) - 1 == parts, (sizes, parts, cuts)
        assert all(a < b for a, b in itertools.pairwise(bounds)), (sizes, parts, cuts)
        got = max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds))
        assert got == _best_max(sizes, parts), (sizes, parts, cuts)


def test_int_larger_than_tensor_count_is_refused():
    with pytest.raises(GroupingError, match=r"4 parameter tensor\(s\) into 5.*between 1 and 4"):
        resolve_grouping(mlp(), 5, execution_order=["0.weight", "0.bias", "2.weight", "2.bias"])


@pytest.mark.parametrize("parts", [0, -1])
def test_int_not_positive_is_refused(parts):
    with pytest.raises(GroupingError, match="between 1 and 4"):
        resolve_grouping(mlp(), parts, execution_order=[])


def test_int_too_large_refused_at_first_forward_and_model_left_usable():
    model = mlp()
    engine = ClippingEngine(model, grouping=5)
    with engine:
        with pytest.raises(GroupingError, match="into 5"):
            model(torch.randn(2, 4))
        assert all(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------- explicit patterns
def test_patterns_mapping_glob_and_regex():
    model = mlp()
    g = resolve_grouping(model, {"weights": ["*.weight"], "biases": ["re:\\d+\\.bias"]})
    assert g.groups == {"weights": ("0.weight", "2.weight"), "biases": ("0.bias", "2.bias")}
    assert g.spec == "explicit"


def test_regex_is_a_full_match():
    # "re:0" must not match "0.weight" by prefix.
    with pytest.raises(GroupingError, match="re:0"):
        resolve_grouping(mlp(), {"a": ["re:0"], "b": ["*"]})


def test_patterns_list_of_lists_named_by_position():
    g = resolve_grouping(mlp(), [["0.*"], ["2.*"]])
    assert g.groups == {"group0": ("0.weight", "0.bias"), "group1": ("2.weight", "2.bias")}


def test_glob_character_class():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    g = resolve_grouping(model, {"low": ["[0-1].*"], "high": ["[2-3].*"]})
    assert g.groups["low"] == ("0.weight", "0.bias", "1.weight", "1.bias")


@pytest.mark.parametrize("pattern", ["head.weight", "re:head\\.weight", "head.w*"])
def test_pattern_matches_tied_alias(pattern):
    """A pattern on an alias (head.weight) selects the tied tensor under its canonical name (emb.weight)."""
    g = resolve_grouping(Tied(), {"tied": [pattern], "rest": ["mid.*", "head.bias", "scale"]})
    assert g.groups["tied"] == ("emb.weight",)


def test_alias_and_canonical_pattern_in_two_groups_is_a_duplicate():
    with pytest.raises(GroupingError, match=r"emb\.weight -> \['a', 'b'\]"):
        resolve_grouping(Tied(), {"a": ["emb.*"], "b": ["head.*", "mid.*", "scale"]})


def test_missing_parameter_is_named():
    with pytest.raises(GroupingError) as info:
        resolve_grouping(mlp(), {"first": ["0.*"], "w": ["2.weight"]})
    message = str(info.value)
    assert "in no group" in message and "'2.bias'" in message
    assert "'0.weight'" not in message and "'2.weight'" not in message


def test_duplicated_parameter_is_named_with_its_groups():
    with pytest.raises(GroupingError) as info:
        resolve_grouping(mlp(), {"first": ["0.*"], "weights": ["*.weight"], "rest": ["2.bias"]})
    message = str(info.value)
    assert "in several groups" in message
    assert "0.weight -> ['first', 'weights']" in message
    assert "2.weight" not in message.split("in several groups")[1]


def test_pattern_matching_nothing_is_named():
    with pytest.raises(GroupingError) as info:
        resolve_grouping(mlp(), {"all": ["*"], "typo": ["encoder.*"]})
    message = str(info.value)
    assert "typo: 'encoder.*'" in message
    assert "0.weight" in message  # lists the trainable parameters to help fix the pattern


def test_pattern_string_instead_of_list():
    with pytest.raises(GroupingError, match=r"\['0\.\*'\]"):
        resolve_grouping(mlp(), {"a": "0.*", "b": ["2.*"]})


def test_group_with_no_patterns_is_refused():
    with pytest.raises(GroupingError, match=r"\['empty'\] contain no trainable parameter"):
        resolve_grouping(mlp(), {"all": ["*"], "empty": []})


def test_pattern_matching_only_frozen_parameters_matches_nothing():
    model = mlp()
    model[0].requires_grad_(False)
    with pytest.raises(GroupingError, match=r"'0\.\*'"):
        resolve_grouping(model, {"frozen": ["0.*"], "rest": ["2.*"]})


# ---------------------------------------------------------------------- callable
def test_callable_keys_are_stringified():
    g = resolve_grouping(mlp(), lambda name, p: p.dim())
    assert g.groups == {"2": ("0.weight", "2.weight"), "1": ("0.bias", "2.bias")}
    assert g.spec.startswith("callable")


def test_callable_receives_the_parameters():
    model = mlp()
    seen = {}

    def key(name, p):
        seen[name] = p
        return "x"

    resolve_grouping(model, key)
    assert all(seen[n] is p for n, p in model.named_parameters())


# ---------------------------------------------------------------------- frozen parameters
@pytest.mark.parametrize("spec", ["all-layer", "layer-wise", "param-wise", "per-device", lambda n, p: n[0]])
def test_frozen_parameters_are_not_grouped(spec):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    names = {n for names in resolve_grouping(model, spec).groups.values() for n in names}
    assert names == {"0.weight", "0.bias", "4.weight"}


def test_frozen_parameters_are_not_grouped_by_int():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    engine = ClippingEngine(model, grouping=4)
    with engine:
        g = engine.resolve_grouping(torch.randn(2, 4))
    assert list(g.groups.values()) == [("0.weight",), ("0.bias",), ("4.weight",), ("4.bias",)]


def test_all_frozen_is_refused():
    model = mlp().requires_grad_(False)
    with pytest.raises(GroupingError, match="no trainable parameters"):
        resolve_grouping(model, "all-layer")
    with pytest.raises(GroupingError, match="no trainable parameters"):
        ClippingEngine(model)


# ---------------------------------------------------------------------- thresholds and sensitivity
@pytest.mark.parametrize(("spec", "m"), [("all-layer", 1), ("layer-wise", 2), ("param-wise", 4)])
def test_default_thresholds_split_total(spec, m):
    engine = ClippingEngine(mlp(), grouping=spec, max_grad_norm=3.0)
    assert len(engine.thresholds) == m
    assert all(r == pytest.approx(3.0 / math.sqrt(m)) for r in engine.thresholds.values())
    assert engine.sensitivity == pytest.approx(3.0)


def test_int_grouping_thresholds_after_first_forward():
    model = OutOfOrder()
    engine = ClippingEngine(model, grouping=3, max_grad_norm=2.0)
    with pytest.raises(AttachError, match="first forward"):
        _ = engine.sensitivity
    with engine:
        engine.resolve_grouping(torch.randn(2, 4))
    assert engine.thresholds == pytest.approx({f"block{k}": 2.0 / math.sqrt(3) for k in range(3)})
    assert engine.sensitivity == pytest.approx(2.0)


def test_explicit_thresholds_and_sensitivity():
    engine = ClippingEngine(mlp(), grouping="layer-wise", max_grad_norm={"0": 1.0, "2": 0.5})
    assert engine.thresholds == {"0": 1.0, "2": 0.5}
    assert engine.sensitivity == pytest.approx(math.sqrt(1.25))


def test_explicit_thresholds_are_used_per_group():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with ClippingEngine(model, grouping="layer-wise", max_grad_norm={"0": 1e-3, "2": 1e6}) as engine:
        nn.functional.cross_entropy(model(x), y).backward()
    report = engine.last_report
    assert report.thresholds == {"0": 1e-3, "2": 1e6}
    # group "0" is clipped to exactly its threshold; group "2" is untouched.
    assert torch.allclose(report.clip_factors["0"] * report.per_sample_norms["0"], torch.full((6,), 1e-3))
    assert torch.equal(report.clip_factors["2"], torch.ones(6))


@pytest.mark.parametrize(
    ("thresholds", "match"),
    [
        ({"0": 1.0}, r"missing \['2'\]"),
        ({"0": 1.0, "2": 1.0, "4": 1.0}, r"unknown \['4'\]"),
        ({"0": 1.0, "2": 0.0}, "'2'"),
        ({"0": -1.0, "2": 1.0}, "'0'"),
        ({"0": math.inf, "2": 1.0}, "'0'"),
        ({"0": math.nan, "2": 1.0}, "'0'"),
    ],
)
def test_bad_explicit_thresholds(thresholds, match):
    with pytest.raises(ValueError, match=match):
        ClippingEngine(mlp(), grouping="layer-wise", max_grad_norm=thresholds)


@pytest.mark.parametrize("total", [0.0, -1.0, math.inf, math.nan])
def test_bad_total_threshold(total):
    with pytest.raises(ValueError, match="max_grad_norm"):
        ClippingEngine(mlp(), max_grad_norm=total)


def test_set_thresholds_validates_and_updates_sensitivity():
    engine = ClippingEngine(mlp(), grouping="layer-wise", max_grad_norm=1.0)
    engine.set_thresholds({"0": 3.0, "2": 4.0})
    assert engine.sensitivity == pytest.approx(5.0)
    with pytest.raises(ValueError, match="missing"):
        engine.set_thresholds({"0": 3.0})
    assert engine.thresholds == {"0": 3.0, "2": 4.0}  # a refused update changes nothing


# ---------------------------------------------------------------------- describe
def test_describe_lists_groups_parameters_thresholds_and_rules():
    model = Tied()
    engine = ClippingEngine(model, grouping="layer-wise", max_grad_norm=2.0)
    text = engine.describe()
    assert "grouping layer-wise: 4 group(s)" in text
    for group in ("<root>", "emb", "mid", "head"):
        assert f"[{group}]" in text
    for name in ("emb.weight (10, 4)", "mid.weight (4, 4)", "head.bias (10,)", "scale (4,)"):
        assert name in text
    assert "R=1" in text  # 2 / sqrt(4)
    assert "sensitivity S = 2" in text
    assert "emb (Embedding)" in text and "mid (Linear)" in text
    assert "<root> (Tied): generic" in text


def test_describe_int_before_and_after_resolution():
    model = OutOfOrder()
    engine = ClippingEngine(model, grouping=2)
    assert "resolved at the first forward pass" in engine.describe()
    with engine:
        engine.resolve_grouping(torch.randn(2, 4))
    text = engine.describe()
    assert "[block0] 1 tensor(s), 24 parameters" in text
    assert "[block1] 3 tensor(s), 50 parameters" in text


def test_describe_omits_frozen():
    model = mlp()
    model[0].requires_grad_(False)
    text = ClippingEngine(model, grouping="param-wise").describe()
    assert "0.weight" not in text and "2.weight" in text
