"""audit_report, the Auditor in a user's loop, JSON output and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from groupclip.audit import Auditor, DiracCanaries, audit_report, plot_scores


def test_report_fields_and_verdict():
    rng = np.random.default_rng(0)
    included = rng.random(600) < 0.5
    leak = audit_report(rng.normal(size=600) + 8 * included, included, claimed_epsilon=1.0, delta=1e-5)
    assert leak.contradicted and leak.lower_bound == leak.one_run.epsilon > 1.0
    assert (leak.canaries, leak.included) == (600, int(included.sum()))
    honest = audit_report(rng.normal(size=600), included, claimed_epsilon=1.0, delta=1e-5)
    assert not honest.contradicted
    text = json.dumps(leak.to_dict(), allow_nan=False)  # strict JSON: infinities become strings
    assert '"contradicted": true' in text
    assert "verdict" in leak.summary() and "CONTRADICTED" in leak.summary()


def test_report_with_one_side_only_skips_the_comparisons():
    report = audit_report([1.0, 2.0, 3.0], [True, True, True], claimed_epsilon=1.0, delta=1e-5)
    assert report.gdp is None and report.threshold is None and not report.contradicted


def test_auditor_in_a_users_loop():
    canaries = DiracCanaries(8, nn.Linear(2, 2), seed=0)
    auditor = Auditor(canaries, delta=1e-5)
    with pytest.raises(RuntimeError):
        auditor.scores(canaries.model)
    auditor.start(canaries.model)
    with torch.no_grad():  # stand-in for training: the included canaries' coordinates moved down
        canaries.model.audit[0].table.weight[:8, 0] -= canaries.included.double().float()
    scores = auditor.scores(canaries.model)
    assert np.array_equal(scores > 0, auditor.included)
    report = auditor.finish(canaries.model, claimed_epsilon=10.0)
    assert report.canaries == 8 and not report.contradicted


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    included = np.arange(200) % 2 == 0
    path = plot_scores(np.random.default_rng(0).normal(size=200) + included, included, tmp_path / "a" / "s.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
