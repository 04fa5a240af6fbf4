"""Plots and a Markdown summary of a compression run, from its ``history.jsonl``.

:func:`make_report` draws, with matplotlib's Agg canvas (no display, no pyplot state):

* ``ranks.png``: rank of every factorized layer, initial against final (paper Fig. 5);
* ``params_macs.png``: parameters and MACs over the epochs (paper Fig. 4);
* ``singular_values.png``: singular values of a few layers over the epochs, one heatmap per
  layer (paper Fig. 6; the first, middle and last layers when there are many);
* ``losses.png``: the loss terms and the learning rate over the epochs;
* ``accuracy.png``: train/val top-1 (and top-5) over the epochs;

and writes ``report.md`` (final top-1, parameters and MACs removed, a per-layer rank table, a line when
the run is unfinished) linking them. The initial ranks are ``run.json``'s ``full_ranks`` when present, else
the ranks at the start of the first recorded epoch (its ``ranks`` with its ``pruned`` layers put back at
their start ranks). The history is read tolerantly: loss and accuracy keys are recognised by name
(``*loss*``, ``L_*``, ``*top1*``, ...) and nested dicts are flattened with ``/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._format import si as _si
from ._format import size_change

__all__ = ["Report", "make_report", "read_history"]

_SPECIAL = ("ranks", "singular_values")


def read_history(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/history.jsonl``, one dict per epoch.

    Raises:
        ValueError: The file is missing, empty or has a line that is not a JSON object (named).
    """
    path = Path(run_dir).expanduser() / "history.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: {str(path.parent)!r} is not a dprp run directory with a "
                         "training history (written by `dprp compress --out RUN_DIR`).")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{str(path)!r} line {i} is not valid JSON ({exc}); the file is corrupt.") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{str(path)!r} line {i} is not a JSON object; the file is corrupt.")
        records.append(rec)
    if not records:
        raise ValueError(f"{str(path)!r} is empty: no epoch has finished yet.")
    return records


def _flatten(rec: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric entries of a record, nested dicts joined with '/', ranks/singular values left out."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if not prefix and k in _SPECIAL:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


_LOSS_TERMS = ("app", "ce", "kd", "orth", "sort", "comp", "structure", "total_reg", "reg")
"""Loss-term names the trainer writes besides ``*loss*`` (L_app, L_orth, L_sort, L_comp, L_str, ...)."""


def _is_loss(key: str) -> bool:
    k = key.lower()
    return "loss" in k or k.startswith("l_") or k.split("/")[-1] in _LOSS_TERMS


def _is_acc(key: str) -> bool:
    k = key.lower()
    return "top1" in k or "top5" in k or "acc" in k


def _pick(keys: list[str], must: tuple[str, ...], prefer: tuple[str, ...]) -> str | None:
    """A key containing every `must` substring, preferring exact names in `prefer`."""
    for p in prefer:
        if p in keys:
            return p
    for k in keys:
        lk = k.lower()
        if all(m in lk for m in must):
            return k
    return None


_PERCENT_KEYS = ("train_top1", "train_top5", "val_top1", "val_top5")  # the trainer writes these in percent


def _is_fraction(key: str, values: list[float]) -> bool:
    """True for accuracies of another tool's history given as fractions in [0, 1] (the trainer's are percent)."""
    return key not in _PERCENT_KEYS and bool(values) and max(values) <= 1.0


def _percent(key: str, values: list[float]) -> list[float]:
    """Accuracies as percentages."""
    return [v * 100 for v in values] if _is_fraction(key, values) else values


def _epochs(records: list[dict[str, Any]]) -> list[float]:
    return [float(r.get("epoch", i)) for i, r in enumerate(records)]


def _start_ranks(records: list[dict[str, Any]]) -> tuple[dict[str, int], float | None, bool]:
    """Ranks at the start of the first record with ranks (its `pruned` starts put back), that record's epoch, and
    whether the record said what it pruned (histories of older versions have no `pruned`)."""
    for i, rec in enumerate(records):
        ranks = rec.get("ranks")
        if not isinstance(ranks, dict) or not ranks:
            continue
        start = {n: int(v) for n, v in ranks.items() if isinstance(v, (int, float))}
        pruned = rec.get("pruned")
        for name, change in (pruned.items() if isinstance(pruned, dict) else ()):
            if isinstance(change, (list, tuple)) and change and isinstance(change[0], (int, float)):
                start[name] = int(change[0])
        return start, float(rec.get("epoch", i)), "pruned" in rec
    return {}, None, False


def _unfinished(root: Path, info: dict[str, Any], records: list[dict[str, Any]]) -> str | None:
    """A report.md line saying the run is unfinished (run.json status "training", or fewer epochs than its config)."""
    cfg = info.get("config") if isinstance(info.get("config"), dict) else {}
    planned = cfg.get("epochs")
    planned = int(planned) if isinstance(planned, (int, float)) and not isinstance(planned, bool) else None
    how = (f"`dprp compress --out {root} --resume`" if info else
           f"`compress(..., run_dir=..., resume='{root / 'checkpoint.pt'}')` (Python API)")
    if planned is not None and len(records) < planned:
        return (f"- **unfinished run**: {len(records)} of {planned} epochs recorded (stopped early, or still "
                f"training); continue it with {how}")
    if info.get("status") == "training":
        return (f"- **unfinished run**: {len(records)} epochs recorded but the model was not exported (run.json "
                "status \"training\": stopped, or still running); finish it with "
                f"{how}")
    return None


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _epoch_locator():
    """Whole-epoch x ticks; min_n_ticks=1 keeps a 1-epoch run at the single tick 0 (not 0.00, 0.02, ...)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True, min_n_ticks=1)


# ----------------------------------------------------------------------------- plots
def _plot_ranks(path: Path, names: list[str], initial: list[int], final: list[int], initial_label: str) -> None:
    import numpy as np

    n = len(names)
    fig = _figure(max(6.0, 0.28 * n + 2), 4.5)
    ax = fig.subplots()
    x = np.arange(n)
    ax.bar(x - 0.2, initial, 0.4, label=initial_label, color="#9ecae1")
    ax.bar(x + 0.2, final, 0.4, label="final", color="#08519c")
    ax.set_xticks(x, names, rotation=90, fontsize=7 if n > 20 else 8)
    ax.set_ylabel("rank")
    ax.set_title("Rank per layer (cf. paper Fig. 5)")
    ax.set_ylim(0, max(initial + final + [1]) * 1.25)
    ax.legend(loc="upper right", ncols=2)
    fig.savefig(path)


def _plot_params_macs(path: Path, epochs: list[float], params: list[float], macs: list[float],
                      dense: dict[str, float], exported: dict[str, float]) -> None:
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2)
    lines = {"params": "training model (U, s, V; eqs. 4/7)", "macs": "training model, factorized realisation"}
    for ax, values, label, key in ((axes[0], params, "parameters", "params"), (axes[1], macs, "MACs", "macs")):
        pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=lines[key])
        if dense.get(key):
            ax.axhline(dense[key], color="grey", ls="--", label="dense")
        if exported.get(key) and pts:  # what ships: the export keeps a layer dense where that is smaller
            ax.plot([pts[-1][0]], [exported[key]], marker="*", ms=12, ls="none", color="tab:green",
                    label="exported model")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_epoch_locator())
        ax.set_ylabel(label)
        ax.set_title(f"{label} over training (cf. paper Fig. 4)")
        ax.legend()
    fig.savefig(path)


def _plot_singular_values(path: Path, epochs: list[float], records: list[dict[str, Any]], layers: list[str],
                          full: dict[str, int]) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig = _figure(4.2 * len(layers), 4)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, name in zip(axes, layers):
        series = [r.get("singular_values", {}).get(name) or [] for r in records]
        height = max([len(s) for s in series] + [int(full.get(name, 0))])
        grid = np.full((max(height, 1), len(records)), np.nan)
        for j, s in enumerate(series):
            vals = np.asarray([abs(float(v)) for v in s], dtype=float)
            with np.errstate(divide="ignore"):
                grid[: len(vals), j] = np.log10(np.maximum(vals, 1e-12))
        extent = (min(epochs) - 0.5, max(epochs) + 0.5, height + 0.5, 0.5) if epochs else None
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", extent=extent)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("singular value index")
        ax.xaxis.set_major_locator(_epoch_locator())
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        fig.colorbar(im, ax=ax, label="log10 sigma")
    fig.suptitle("Singular values over training (blank: pruned; cf. paper Fig. 6)")
    fig.savefig(path)


def _plot_lines(path: Path, epochs: list[float], groups: list[tuple[str, dict[str, list[float]], bool]]) -> None:
    fig = _figure(6 * len(groups), 4)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (title, series, logy) in zip(axes, groups):
        for key, values in series.items():
            pts = [(e, v) for e, v in zip(epochs, values) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=key)
        if logy and all(v is None or v > 0 for vs in series.values() for v in vs):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_epoch_locator())
        if series:
            ax.legend(fontsize=8)
    fig.savefig(path)


# ----------------------------------------------------------------------------- report
def _series(flat: list[dict[str, float]], key: str) -> list[float | None]:
    return [f.get(key) for f in flat]


@dataclass(frozen=True)
class Report:
    """The files one `make_report` call wrote.

    Attributes:
        path: ``RUN_DIR/report.md``.
        plots: The PNG plots written this time, in the report's order (other PNGs in the folder are not listed).
    """

    path: Path
    plots: list[Path] = field(default_factory=list)

    def __fspath__(self) -> str:
        """The report's path, so that ``open(report)`` and ``Path(report)`` work as with the Path it once was."""
        return os.fspath(self.path)


def make_report(run_dir: str | os.PathLike[str]) -> Report:
    """Write the PNG plots and ``report.md`` of a run directory; return the files written.

    Reads ``history.jsonl`` and, when present, ``run.json`` (model, data, config, status, dense
    figures before compression and the layers' full ranks, written by ``dprp compress``). Without
    ``full_ranks`` the initial ranks are those at the start of the first recorded epoch.

    Returns:
        A `Report` with the path of ``report.md`` and the plots written this time.

    Raises:
        ValueError: No or corrupt history (the message names the file).
    """
    root = Path(run_dir).expanduser()
    records = read_history(root)
    info: dict[str, Any] = {}
    if (root / "run.json").is_file():
        try:
            loaded = json.loads((root / "run.json").read_text())
            info = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            info = {}
    epochs = _epochs(records)
    flat = [_flatten(r) for r in records]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    written: list[tuple[str, str]] = []

    # ranks (Fig. 5)
    start_ranks, start_epoch, pruning_known = _start_ranks(records)
    final_ranks = next((r["ranks"] for r in reversed(records) if isinstance(r.get("ranks"), dict) and r["ranks"]), {})
    full = info.get("full_ranks") if isinstance(info.get("full_ranks"), dict) else {}
    names = list(final_ranks) or list(start_ranks)
    initial_label = ("initial (full rank)" if full
                     else f"initial (start of epoch {start_epoch or 0:g})" if pruning_known
                     else f"first record (end of epoch {start_epoch or 0:g})")
    initial = [int(full.get(n, start_ranks.get(n, final_ranks.get(n, 0)))) for n in names]
    initial_by_name = {**start_ranks, **{n: int(v) for n, v in full.items() if isinstance(v, (int, float))}}
    final = [int(final_ranks.get(n, 0)) for n in names]
    if names:
        _plot_ranks(root / "ranks.png", names, initial, final, initial_label)
        written.append(("ranks.png", "Rank per layer, initial vs final (paper Fig. 5)"))

    # params / MACs (Fig. 4)
    before = (info.get("results") or {}).get("before") or {}
    dense = {"params": before.get("params") or flat[-1].get("dense_params"),
             "macs": before.get("macs") or flat[-1].get("dense_macs")}
    params = _series(flat, "params")
    macs = _series(flat, "macs")
    if any(v is not None for v in params + macs):
        exported = (info.get("results") or {}).get("after") or {}
        _plot_params_macs(root / "params_macs.png", epochs, params, macs, dense, exported)
        written.append(("params_macs.png", "Parameters and MACs over the epochs (paper Fig. 4)"))

    # singular values (Fig. 6)
    sv_layers = []
    for r in records:
        for n in (r.get("singular_values") or {}):
            if n not in sv_layers:
                sv_layers.append(n)
    if sv_layers:
        chosen = sv_layers if len(sv_layers) <= 3 else [sv_layers[0], sv_layers[len(sv_layers) // 2], sv_layers[-1]]
        _plot_singular_values(root / "singular_values.png", epochs, records, chosen, initial_by_name)
        written.append(("singular_values.png", f"Singular values over training: {', '.join(chosen)} (paper Fig. 6)"))

    # losses and learning rate
    loss_keys = [k for k in keys if _is_loss(k) and any(f.get(k) for f in flat)]  # all-zero terms say nothing
    lr_key = _pick(keys, ("lr",), ("lr", "learning_rate"))
    groups = []
    if loss_keys:
        groups.append(("loss terms", {k: _series(flat, k) for k in loss_keys}, True))
    if lr_key:
        groups.append(("learning rate", {lr_key: _series(flat, lr_key)}, True))
    if groups:
        _plot_lines(root / "losses.png", epochs, groups)
        written.append(("losses.png", "Loss terms and learning rate over the epochs"))

    # accuracy
    acc_keys = [k for k in keys if _is_acc(k) and not _is_loss(k)]
    if acc_keys:
        series = {}
        for k in acc_keys:
            raw = _series(flat, k)
            known = [v for v in raw if v is not None]
            scale = 100.0 if _is_fraction(k, known) else 1.0
            series[k] = [None if v is None else v * scale for v in raw]
        _plot_lines(root / "accuracy.png", epochs, [("accuracy (%)", series, False)])
        written.append(("accuracy.png", "Top-1/top-5 accuracy over the epochs"))

    # report.md
    val_key = _pick(keys, ("val", "top1"), ("val_top1", "val/top1", "val_acc1", "val_acc"))
    train_key = _pick(keys, ("train", "top1"), ("train_top1", "train/top1", "train_acc1"))
    last = flat[-1]
    lines = [f"# DPRP compression report: {root.resolve().name or root.resolve()}", ""]
    unfinished = _unfinished(root, info, records)
    if unfinished:
        lines += [unfinished]
    if info:
        lines += [f"- model: `{info.get('model', '?')}` (arch `{info.get('arch', '?')}`)",
                  f"- data: `{info.get('data', '?')}`"]
        cfg = info.get("config") or {}
        if cfg:
            lines.append("- config: " + ", ".join(f"{k}={cfg[k]}" for k in
                                                  ("scheme", "epochs", "lr", "lambda_comp", "epsilon", "regularizer")
                                                  if k in cfg))
    lines.append(f"- epochs recorded: {len(records)} (last epoch {epochs[-1]:g})")
    if val_key and last.get(val_key) is not None:
        lines.append(f"- final val top-1: {_percent(val_key, [last[val_key]])[0]:.2f}%")
    if train_key and last.get(train_key) is not None:
        lines.append(f"- final train top-1: {_percent(train_key, [last[train_key]])[0]:.2f}%")
    after = (info.get("results") or {}).get("after") or {}
    for key, label in (("params", "parameters"), ("macs", "MACs")):
        ref = dense.get(key) or flat[0].get(key)
        now = after.get(key) or last.get(key)
        if ref and now is not None:
            origin = "dense" if dense.get(key) else f"epoch {epochs[0]:g}"
            lines.append(f"- {label}: {_si(ref)} ({origin}) -> {_si(now)} ({size_change(ref, now)})")
    if before.get("top1") is not None and after.get("top1") is not None:
        lines.append(f"- top-1: {before['top1']:.2f}% (dense model, as given) -> {after['top1']:.2f}% (exported "
                     "model)")
    elif after.get("top1") is not None and info.get("new_head"):
        lines.append(f"- top-1: {after['top1']:.2f}% (exported model); not measured before training, where the model "
                     "had a new, untrained classifier for the data's classes (compare with a dense fine-tune)")
    lines.append("")
    for fname, caption in written:
        lines += [f"## {caption}", "", f"![{caption}]({fname})", ""]
    if names:
        first = "initial" if full or pruning_known else f"epoch {start_epoch or 0:g} (no record of its pruning)"
        lines += ["## Ranks per layer", "", f"| layer | {first} | final | kept |", "|---|---:|---:|---:|"]
        for n, a, b in zip(names, initial, final):
            lines.append(f"| {n} | {a} | {b} | {b / a:.0%} |" if a else f"| {n} | {a} | {b} | - |")
        lines.append("")
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return Report(out, [root / fname for fname, _ in written])
