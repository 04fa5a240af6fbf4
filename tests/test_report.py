"""`make_report`: initial ranks, the heatmap's height, unfinished runs, the title and the plots it lists."""

from __future__ import annotations

import json
import pathlib

import pytest

from dprp_surgery import report
from dprp_surgery.report import make_report


def write_run(root: pathlib.Path, records: list[dict], info: dict | None = None) -> pathlib.Path:
    """A run directory with `records` as history.jsonl and, when given, `info` as run.json."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if info is not None:
        (root / "run.json").write_text(json.dumps(info))
    return root


def record(epoch: int, ranks: dict[str, int], pruned: dict[str, list[int]] | None = None) -> dict:
    """An epoch record as the trainer writes it (the fields the report reads)."""
    return {"epoch": epoch, "loss": 2.0 - epoch / 10, "val_top1": 40.0 + epoch, "params": 1000 - 10 * epoch,
            "macs": 5000, "ranks": ranks, "pruned": pruned or {},
            "singular_values": {n: [1.0 / (i + 1) for i in range(r)] for n, r in ranks.items()}}


# conv pruned 8 -> 3 in epoch 0 and 3 -> 2 in epoch 1; fc pruned 4 -> 3 in epoch 1 only
RECORDS = [record(0, {"conv": 3, "fc": 4}, {"conv": [8, 3]}), record(1, {"conv": 2, "fc": 3}, {"conv": [3, 2],
                                                                                                   "fc": [4, 3]})]


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every matplotlib Figure the report draws."""
    made: list = []
    figure = report._figure
    monkeypatch.setattr(report, "_figure", lambda w, h: made.append(figure(w, h)) or made[-1])
    return made


def rank_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """{layer: (initial, final, kept)} of report.md's rank table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ("conv", "fc"):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def axes_titled(figures: list, title: str):
    return next(ax for fig in figures for ax in fig.axes if ax.get_title() == title)


def test_initial_ranks_without_run_json_are_those_before_the_first_epochs_pruning(tmp_path, figures):
    """A Python-API or killed run has no full_ranks: epoch 0's `pruned` starts are the initial ranks (Fig. 5, 6)."""
    run = write_run(tmp_path / "api", RECORDS)
    text = make_report(run).path.read_text()
    assert rank_rows(text) == {"conv": ("8", "2", "25%"), "fc": ("4", "3", "75%")}
    ranks_ax = axes_titled(figures, "Rank per layer (cf. paper Fig. 5)")
    labels = [t.get_text() for t in ranks_ax.get_legend().get_texts()]
    assert labels == ["initial (start of epoch 0)", "final"]
    assert [round(p.get_height()) for p in ranks_ax.patches[:2]] == [8, 4]  # the initial bars
    heat = axes_titled(figures, "conv").images[0].get_array()
    assert heat.shape == (8, 2)  # components 4-8, pruned in epoch 0, are blank rows rather than missing
    assert heat.mask[3:, 0].all() and not heat.mask[:3, 0].any()


def test_full_ranks_of_run_json_are_preferred(tmp_path, figures):
    info = {"model": "m", "arch": "a", "status": "done", "config": {"epochs": 2}, "full_ranks": {"conv": 9, "fc": 4}}
    run = write_run(tmp_path / "cli", RECORDS, info)
    text = make_report(run).path.read_text()
    assert rank_rows(text)["conv"] == ("9", "2", "22%")
    labels = [t.get_text() for t in axes_titled(figures, "Rank per layer (cf. paper Fig. 5)").get_legend().get_texts()]
    assert labels == ["initial (full rank)", "final"]
    assert axes_titled(figures, "conv").images[0].get_array().shape == (9, 2)
    assert "unfinished" not in text


@pytest.mark.parametrize(("info", "words"), [
    ({"status": "training", "config": {"epochs": 6}}, ("unfinished run", "2 of 6 epochs recorded", "--resume")),
    ({"status": "training", "config": {"epochs": 2}}, ("unfinished run", "not exported", "--resume")),
    ({"status": "done", "config": {"epochs": 5}}, ("unfinished run", "2 of 5 epochs recorded")),
], ids=["killed", "not-exported", "fewer-epochs"])
def test_an_unfinished_run_says_so(tmp_path, info, words):
    text = make_report(write_run(tmp_path / "run", RECORDS, info)).path.read_text()
    lines = [line for line in text.splitlines() if "unfinished" in line]
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines


def test_title_of_the_current_directory_is_its_name(tmp_path, monkeypatch):
    run = write_run(tmp_path / "r20-tuned", RECORDS)
    monkeypatch.chdir(run)
    assert make_report(".").path.read_text().splitlines()[0] == "# DPRP compression report: r20-tuned"


def test_plots_are_those_written_this_time(tmp_path):
    run = write_run(tmp_path / "run", RECORDS)
    first = make_report(run)
    assert [p.name for p in first.plots] == ["ranks.png", "params_macs.png", "singular_values.png", "losses.png",
                                             "accuracy.png"]
    assert all(p.is_file() for p in first.plots)
    (run / "history.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0, "val_top1": 50.0}) + "\n")
    second = make_report(run)  # ranks.png etc. of the first report stay in the folder but are not this report's
    assert [p.name for p in second.plots] == ["losses.png", "accuracy.png"]
    assert "ranks.png" not in second.path.read_text()


def test_history_without_pruned_records_says_its_first_ranks_are_after_pruning(tmp_path, figures):
    """Histories of older versions have no `pruned`: the first ranks are labelled as the end of epoch 0."""
    old = [{k: v for k, v in r.items() if k != "pruned"} for r in RECORDS]
    text = make_report(write_run(tmp_path / "old", old)).path.read_text()
    assert "| layer | epoch 0 (no record of its pruning) | final | kept |" in text
    assert rank_rows(text)["conv"] == ("3", "2", "67%")
    labels = [t.get_text() for t in axes_titled(figures, "Rank per layer (cf. paper Fig. 5)").get_legend().get_texts()]
    assert labels == ["first record (end of epoch 0)", "final"]


def test_the_report_is_path_like(tmp_path):
    import os

    written = make_report(write_run(tmp_path / "run", RECORDS))
    assert pathlib.Path(written) == tmp_path / "run" / "report.md" == written.path
    with open(written) as f:
        assert f.readline().startswith("# DPRP compression report")
    assert os.fspath(written) == str(written.path)


def test_the_parameter_plot_marks_the_exported_model_and_names_what_it_counts(tmp_path, figures):
    """The training model counts U, s and V (it can be larger than dense); the exported model is what ships."""
    info = {"model": "m", "arch": "a", "status": "done", "config": {"epochs": 2},
            "results": {"before": {"params": 1200, "macs": 6000}, "after": {"params": 900, "macs": 4000}}}
    text = make_report(write_run(tmp_path / "run", RECORDS, info)).path.read_text()
    ax = axes_titled(figures, "parameters over training (cf. paper Fig. 4)")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["training model (U, s, V; eqs. 4/7)", "dense", "exported model"]
    star = ax.get_lines()[-1]
    assert list(star.get_xdata()) == [1] and list(star.get_ydata()) == [900]
    assert "1.20K (dense) -> 900 (25.0% smaller)" in text  # in words: no sign to misread
