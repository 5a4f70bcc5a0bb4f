"""The suite's arithmetic on hand-made runs: paired time ratios, memory ratios, the max-batch extrapolation and
the target verdicts (the real runs are covered end to end by test_bench_cli.py)."""

from __future__ import annotations

import pytest

from benchmarks.harness.suite import SuiteConfig, summarise

GiB = 2**30


def _run(label: str, rnd: int, step: float, peak: int, kind: str = "time", batch: int = 8, **extra) -> dict:
    style, _, mode = label.partition("/")
    return {
        "spec": {"model": "m", "style": style, "norm_mode": mode or "auto"},
        "label": label,
        "kind": kind,
        "round": rnd,
        "batch_size": batch,
        "median_step_s": step,
        "peak_bytes": peak,
        "baseline_bytes": GiB // 2,
        **extra,
    }


def test_time_ratio_is_paired_by_round_and_memory_ratio_uses_medians() -> None:
    cfg = SuiteConfig(models=["m"], memory_cap_bytes=10 * GiB)
    runs = [
        _run("non-private", 0, 1.0, 2 * GiB),
        _run("layer-wise", 0, 1.1, 2 * GiB + GiB // 8),
        _run("non-private", 1, 2.0, 2 * GiB),  # a slow round: the paired ratio is unaffected
        _run("layer-wise", 1, 2.2, 2 * GiB + GiB // 8),
    ]
    rows = summarise(cfg, runs)["models"]["m"]["rows"]
    assert rows["layer-wise"]["time_ratio"] == pytest.approx(1.1)
    assert rows["layer-wise"]["median_step_s"] == pytest.approx(1.65)
    assert rows["layer-wise"]["memory_ratio"] == pytest.approx(17 / 16)
    assert rows["non-private"]["time_ratio"] == pytest.approx(1.0)


def test_max_batch_from_the_per_sample_slope() -> None:
    cfg = SuiteConfig(models=["m"], memory_cap_bytes=10 * GiB)
    runs = [
        _run("non-private", 0, 1.0, 2 * GiB),
        _run("non-private", 0, 1.0, GiB + GiB // 2, kind="half-batch", batch=4),  # 128 MiB per sample
        _run("all-layer", 0, 1.2, 3 * GiB),
        _run("all-layer", 0, 1.2, 2 * GiB, kind="half-batch", batch=4),  # 256 MiB per sample
    ]
    max_batch = summarise(cfg, runs)["models"]["m"]["max_batch"]
    # non-private: intercept 1 GiB, 1/8 GiB per sample -> (10 - 1) * 8 = 72 samples
    assert max_batch["non-private"]["max_batch"] == 72
    # all-layer: intercept 1 GiB, 1/4 GiB per sample -> 36
    assert max_batch["all-layer"]["max_batch"] == 36
    assert max_batch["all-layer"]["vs_non_private"] == pytest.approx(0.5)


def test_failures_are_kept_with_their_error_and_targets_report_misses() -> None:
    cfg = SuiteConfig(models=["gpt2-small"], memory_cap_bytes=10 * GiB)
    runs = [
        _run("non-private", 0, 1.0, GiB),
        _run("all-layer", 0, 1.3, GiB),
        _run("layer-wise", 0, 1.02, GiB),
        _run("opacus-hooks", 0, 2.6, GiB),
        {**_run("opacus-ghost", 0, 0, 0), "error": "NotImplementedError: Parameter tying is not supported"},
    ]
    for r in runs:
        r["spec"]["model"] = "gpt2-small"
    summary = summarise(cfg, runs)
    rows = summary["models"]["gpt2-small"]["rows"]
    assert rows["opacus-ghost"] == {"label": "opacus-ghost", "error": runs[-1]["error"]}
    verdicts = {(t["model"], t["what"]): t for t in summary["targets"]}
    assert verdicts[("gpt2-small", "layer-wise time ratio")]["met"] is True
    assert verdicts[("gpt2-small", "all-layer time ratio")]["met"] is False
    assert verdicts[("gpt2-small", "param-wise time ratio")]["met"] is None  # not measured, not faked
    speedup = next(t for t in summary["targets"] if t["what"].startswith("speedup"))
    assert speedup["value"] == pytest.approx(2.0) and speedup["met"] is True


def test_noisy_rows_are_paired_with_the_noise_floor_of_their_round_and_judged_against_it() -> None:
    cfg = SuiteConfig(models=["vit-base"], memory_cap_bytes=10 * GiB, noise=True)
    runs = [
        _run("non-private", 0, 1.0, GiB),
        _run("non-private+noise", 0, 1.2, GiB),
        _run("layer-wise+noise", 0, 1.32, GiB),
        _run("non-private", 1, 2.0, GiB),  # a slow round: the floor of round 1 is used for round 1 only
        _run("non-private+noise", 1, 2.4, GiB),
        _run("layer-wise+noise", 1, 2.52, GiB),
    ]
    for r in runs:
        r["spec"]["model"] = "vit-base"
    summary = summarise(cfg, runs)
    rows = summary["models"]["vit-base"]["rows"]
    assert rows["layer-wise+noise"]["floor_ratio"] == pytest.approx((1.1 + 1.05) / 2)
    assert rows["layer-wise+noise"]["time_ratio"] == pytest.approx((1.32 + 1.26) / 2)
    assert "floor_ratio" not in rows["non-private+noise"]
    verdicts = {(t["issue"], t["what"]): t for t in summary["targets"]}
    assert verdicts[(13, "layer-wise+noise floor ratio")]["met"] is False  # 1.075 > 1.05
    assert (13, "param-wise+noise floor ratio") not in verdicts  # a style not run with noise is not listed


def test_noise_configurations_are_only_added_when_asked_and_never_for_opacus() -> None:
    plain = SuiteConfig(models=["m"], styles=["non-private", "layer-wise"], norm_modes=False, opacus=True)
    noisy = SuiteConfig(models=["m"], styles=["non-private", "layer-wise"], norm_modes=False, opacus=True, noise=True)
    assert not any(s.noise for s in plain.run_specs("m"))
    labels = [s.label for s in noisy.run_specs("m")]
    assert "non-private+noise" in labels and "layer-wise+noise" in labels
    assert not any(label.startswith("opacus") and label.endswith("+noise") for label in labels)
