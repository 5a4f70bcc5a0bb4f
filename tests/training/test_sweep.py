"""groupclip sweep: grids from files and flags, subsets, resuming, and the aggregated table."""

from __future__ import annotations

import json
import os

import pytest

from groupclip.cli import main
from groupclip.training.recipe import RecipeError
from groupclip.training.sweep import (
    add_shared_overrides,
    collect,
    grid,
    load_sweep,
    overrides_of,
    point_dir,
    render_table,
    run_sweep,
    summarise,
    sweep_from_flags,
)

SPEC = """
name = "tiny"
recipe = "default"
repeat = "seed"
out = "{out}"
set = {{ "data.limit" = 128, "data.test_limit" = 100, "schedule.batch_size" = 64, "schedule.max_steps" = 2 }}

[[axes]]
name = "grouping"
key = "clipping.grouping"
values = ["all-layer", 2]

[[axes]]
name = "clipping"
variants = {{ fixed = {{ "clipping.adaptive" = false }}, automatic = {{ "clipping.clip_fn" = "automatic" }} }}

[[axes]]
name = "seed"
key = "run.seed"
values = [0, 1]
"""


def _spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC.format(out=tmp_path / "out"))
    return load_sweep(str(path))


def test_grid_and_overrides(tmp_path):
    spec = _spec(tmp_path)
    points = grid(spec)
    assert len(points) == 8 and points[0] == {"grouping": "all-layer", "clipping": "fixed", "seed": "0"}
    assert overrides_of(spec, {"grouping": "2", "clipping": "automatic", "seed": "1"}) == {
        "data.limit": 128,
        "data.test_limit": 100,
        "schedule.batch_size": 64,
        "schedule.max_steps": 2,
        "clipping.grouping": 2,
        "clipping.clip_fn": "automatic",
        "run.seed": 1,
    }
    subset = grid(spec, {"grouping": ["2"], "clipping": ["fixed"]})
    assert [p["seed"] for p in subset] == ["0", "1"] and all(p["grouping"] == "2" for p in subset)
    assert point_dir(spec, subset[0]).endswith("grouping=2,clipping=fixed,seed=0")
    with pytest.raises(RecipeError, match="no such axis"):
        grid(spec, {"width": ["1"]})
    with pytest.raises(RecipeError, match=r"unknown value\(s\) \['3'\]"):
        grid(spec, {"grouping": ["3"]})


def test_set_flags_apply_to_a_sweep_file_after_its_own_set(tmp_path):
    spec = _spec(tmp_path)
    add_shared_overrides(spec, ["run.threads=2", "schedule.max_steps=5"])
    point = {"grouping": "2", "clipping": "fixed", "seed": "1"}
    assert overrides_of(spec, point)["run.threads"] == 2 and overrides_of(spec, point)["schedule.max_steps"] == 5
    add_shared_overrides(spec, ["run.seed=7"])  # an axis value still wins
    assert overrides_of(spec, point)["run.seed"] == 1
    with pytest.raises(RecipeError, match="has no field 'thread'"):
        add_shared_overrides(spec, ["run.thread=2"])


@pytest.mark.parametrize("flags", [["--axis", "run.seed=0,1"], ["--recipe", "default"], ["--repeat", "seed"]])
def test_flags_form_options_with_a_sweep_file_are_one_line_errors(tmp_path, flags, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC.format(out=tmp_path / "out"))
    assert main(["sweep", str(path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flags[0] in err, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_dotted_variant_label_is_named(tmp_path):
    path = tmp_path / "dotted.toml"
    path.write_text(
        'name = "d"\nrecipe = "default"\n[[axes]]\nname = "R"\n[axes.variants]\n'
        'R0.1 = { "clipping.max_grad_norm" = 0.1 }\n'
    )
    with pytest.raises(RecipeError, match=r"variant 'R0' holds a nested table; a label with a dot must be quoted"):
        load_sweep(str(path))
    path.write_text(path.read_text().replace("R0.1 =", '"R0.1" ='))
    assert list(load_sweep(str(path)).axes[0].points) == ["R0.1"]


def test_flags_form_and_checks():
    spec = sweep_from_flags("f", "default", ["clipping.grouping=all-layer,layer-wise", "run.seed=0,1"], [], "seed")
    assert [a.name for a in spec.axes] == ["grouping", "seed"]
    assert grid(spec)[1] == {"grouping": "all-layer", "seed": "1"}
    with pytest.raises(RecipeError, match="has no field 'grouping_typo'"):
        sweep_from_flags("f", "default", ["clipping.grouping_typo=1,2"], [], None)
    with pytest.raises(RecipeError, match="repeat = 'seed' is not an axis"):
        sweep_from_flags("f", "default", ["clipping.grouping=all-layer"], [], "seed")


@pytest.mark.slow
def test_sweep_runs_resumes_and_tabulates(tmp_path):
    spec = _spec(tmp_path)
    only = {"clipping": ["fixed"], "grouping": ["2"]}
    rows = run_sweep(spec, jobs=2, only=only, log=lambda _: None)
    assert len(collect(spec)) == 2
    assert [(r["grouping"], r["clipping"], r["n"]) for r in rows] == [("2", "fixed", 2)]
    row = rows[0]
    values = [run["value"] for run in row["runs"]]
    assert row["mean"] == pytest.approx(sum(values) / 2) and row["min"] == min(values)
    assert all(run["groups"] == 2 for run in row["runs"])

    # resuming: finished points are not run again (their final.json is untouched)
    def stamps() -> dict[str, float]:
        return {
            d: os.path.getmtime(os.path.join(d, "final.json")) for d in (point_dir(spec, p) for p, _ in collect(spec))
        }

    finals = stamps()
    messages = []
    run_sweep(spec, jobs=1, only=only, log=messages.append)
    assert "2 done, 0 to run" in messages[0]
    assert finals == stamps()
    table = render_table(spec, summarise(spec))
    assert "| grouping | clipping | n | mean over seed |" in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["rows"]) == 1


@pytest.mark.slow
def test_failed_point_is_reported_and_rerun(tmp_path):
    spec = sweep_from_flags("bad", "default", ["run.seed=0"], ["data.limit=0", "schedule.max_steps=1"], None)
    spec.out = str(tmp_path / "bad")
    spec.common["data.name"] = "no-such-data"
    messages = []
    run_sweep(spec, log=messages.append)
    assert any("FAILED" in m for m in messages)
    log = open(os.path.join(point_dir(spec, grid(spec)[0]), "log.txt")).read()
    assert "no-such-data" in log
    assert not collect(spec)
