"""CPU inference latency of exported DPRP models: dense vs factorized vs auto(latency), eager and onnxruntime.

Two models are measured (issue 4):

* a compressed CIFAR ResNet-20 (32x32 inputs): factorized with the paper scheme and truncated to
  ``--keep`` of every layer's rank, to the ranks of a file (``--ranks``: {layer: rank}, a run.json or a
  history.jsonl), or taken from a real ``dprp compress`` run directory (``--run-dir``);
* a compressed timm model (``--timm``, default convnext_atto at 224 px), truncated to ``--keep``.

Each is exported three ways (:func:`dprp_surgery.export.export`): ``dense`` (the original layers),
``factorized`` (two standard layers per SVD layer) and ``auto`` with the latency objective (per layer the
faster form, timed at the batch size of the row). Every form runs at batch 1 and 64 in PyTorch eager
(``torch.inference_mode``) and in onnxruntime (CPUExecutionProvider, same thread count). The three forms of a row
are timed in interleaved rounds (dense, factorized, auto, dense, ...), each round one block of calls of about 20 ms
per form after a warm-up (at least 2 calls and 0.5 s); the table gives the median over ``--runs`` rounds of the
per-call time and the ratio to dense in the same run.

Usage:

    python benchmarks/latency.py                                   # both models, keep 0.5
    python benchmarks/latency.py --keep 0.25 --timm resnet18 --timm-size 160
    python benchmarks/latency.py --run-dir runs/demo --skip-timm --md docs/benchmarks.md
    python benchmarks/latency.py --case run:runs/r20/resnet20/tuned --case timm:convnext_atto:channel:0.25
    python benchmarks/latency.py --smoke          # seconds, meaningless timings: keeps the script alive in tests

``--md FILE`` writes the table with the command, machine and versions into FILE under
``## Inference latency (issue 4)``, between the marker comments ``<!-- latency.py: generated start -->`` and
``<!-- latency.py: generated end -->``: only that block is replaced, so the hand-written text around it (and every
other section) is kept. A section without the markers gets the new block right after its heading, the old text
below it (a note says so). ``--md`` and ``--json`` files are replaced atomically (temporary file + rename).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dprp_surgery import DPRPConfig, factorize, svd_layers
from dprp_surgery._files import write_text_atomic
from dprp_surgery.accounting import count_params, summarize
from dprp_surgery.config import SCHEMES
from dprp_surgery.export import export, to_onnx
from dprp_surgery.io import RANKS_FORMATS, check_ranks_match, check_writable, read_ranks

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Inference latency (issue 4)"
START = "<!-- latency.py: generated start -->"
END = "<!-- latency.py: generated end -->"
CASE_FORMS = ("use cifar:resnet20:SCHEME:KEEP, timm:NAME:SCHEME:KEEP[:SIZE] or run:DIR (SCHEME paper|channel|spatial, "
              "KEEP in (0, 1], SIZE a positive image size)")


class CaseError(ValueError):
    """A --case (or single-model flag) that cannot be measured; the message names it and the fix."""


def interleaved_medians(fns: list, runs: int, warmup_s: float = 0.5, min_block_s: float = 0.02) -> list[float]:
    """Median seconds of one call of each of `fns`, timed in interleaved rounds.

    Each function is warmed up (>= 2 calls and >= `warmup_s` seconds) and calibrated to a block of calls
    lasting about `min_block_s` (a 1 ms forward is timed as the mean of a block, not one call at a time);
    then every round times one block of each function in turn, so a slow drift of the machine's load hits
    every form alike. The result is the median over `runs` rounds of each function's per-call time.
    """
    blocks = []
    for fn in fns:
        start, calls = time.perf_counter(), 0
        while calls < 2 or time.perf_counter() - start < warmup_s:
            fn()
            calls += 1
        t0 = time.perf_counter()
        fn()
        one = time.perf_counter() - t0
        blocks.append(max(1, math.ceil(min_block_s / max(one, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, (fn, n) in enumerate(zip(fns, blocks)):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[i].append((time.perf_counter() - t0) / n)
    return [statistics.median(t) for t in times]


def warm_up_process(seconds: float = 5.0) -> None:
    """Run a small CNN for a few seconds: the first seconds of a process run much slower (thread pools, caches)."""
    from dprp_surgery.models import resnet20

    model, x = resnet20().eval(), torch.randn(8, 3, 32, 32)
    start = time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            model(x)


def truncate(model: nn.Module, keep: float | None, ranks: dict[str, int] | None) -> nn.Module:
    """Truncate every SVD layer to ceil(keep * rank) or to the given ranks."""
    for name, layer in svd_layers(model):
        if ranks is not None:
            if name in ranks:
                layer.truncate_(min(int(ranks[name]), layer.rank))
        else:
            layer.truncate_(max(1, math.ceil(keep * layer.rank)))
    return model


def cifar_model(scheme: str, keep: float, ranks_file: str | None = None) -> tuple[nn.Module, tuple[int, ...], str]:
    """The compressed CIFAR ResNet-20 (SVD form, shared pretrained weights when present), input size, description.

    Args:
        scheme: The matricization of every layer.
        keep: The fraction of every layer's rank kept (without `ranks_file`).
        ranks_file: A ranks file (see `dprp_surgery.io.read_ranks`): every layer it names is cut to its rank.
    """
    from dprp_surgery.models import load_cifar_checkpoint, resnet20

    model = resnet20()
    weights = REPO.parent / "shared" / "models" / "cifar10_resnet20.th"
    if weights.is_file():
        load_cifar_checkpoint(model, weights)
    f = factorize(model, DPRPConfig(scheme=scheme))
    ranks = read_ranks(ranks_file) if ranks_file else None
    truncate(f, keep, ranks)
    how = f"ranks from {ranks_file}" if ranks_file else f"keep {keep:g} of each rank"
    return f.eval(), (3, 32, 32), f"cifar:resnet20, {scheme} scheme, {how}"


def run_model(run_dir: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """The trained model of a dprp run directory (SVD form at its final ranks) and the input size it ran at."""
    from dprp_surgery.io import data_recipe, load_model, read_run_info

    model, arch = load_model(run_dir)
    recorded = read_run_info(run_dir).get("input_size") or getattr(model, "_dprp_input_size", None)
    size = tuple(int(v) for v in recorded) if recorded else data_recipe(arch, model).input_size(32)
    return model.eval(), size, f"{arch} from run {run_dir} at {'x'.join(map(str, size[1:]))}px"


def timm_model(name: str, scheme: str, keep: float, size: int) -> tuple[nn.Module, tuple[int, ...], str]:
    """The compressed timm model (SVD form, random init), its input size and a description."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    f = factorize(model, DPRPConfig(scheme=scheme))
    truncate(f, keep, None)
    return f.eval(), (3, size, size), f"timm:{name} at {size}px, {scheme} scheme, keep {keep:g} of each rank"


def _keep(spec: str, text: str) -> float:
    """KEEP of a --case: a number in (0, 1]."""
    try:
        keep = float(text)
    except ValueError:
        keep = math.nan
    if not 0 < keep <= 1:  # also nan
        raise CaseError(f"--case {spec!r}: KEEP {text!r} is not a number in (0, 1] (the fraction of every layer's "
                        "rank kept, e.g. 0.25); " + CASE_FORMS)
    return keep


def _scheme(spec: str, scheme: str) -> str:
    if scheme not in SCHEMES:
        raise CaseError(f"--case {spec!r}: unknown SCHEME {scheme!r}; use one of {', '.join(SCHEMES)}")
    return scheme


def check_timm_name(name: str, what: str) -> None:
    """Refuse a timm architecture that timm does not know (before anything is timed)."""
    from dprp_surgery.io import ModelSpecError, _check_name

    try:
        _check_name("timm", name)  # the message suggests close names
    except ModelSpecError as exc:
        raise CaseError(f"{what}: {exc}") from None


def check_ranks_file(path: str, scheme: str) -> None:
    """Refuse a --ranks file that cannot be read or names no layer of the factorized CIFAR ResNet-20."""
    from dprp_surgery.models import resnet20

    try:
        ranks = read_ranks(path)
        check_ranks_match(ranks, [n for n, _ in svd_layers(factorize(resnet20(), DPRPConfig(scheme=scheme)))], path)
    except ValueError as exc:
        raise CaseError(f"--ranks: {exc}") from None


def check_run(path: str, what: str) -> tuple[nn.Module, tuple[int, ...], str]:
    """Load the model of a run directory (or dprp artifact) now, so a bad path is refused before any timing."""
    from dprp_surgery.io import parse_model_spec

    if not Path(path).expanduser().exists():
        raise CaseError(f"{what} {path!r} does not exist: give a dprp run directory (run.json, checkpoint.pt; e.g. "
                        "from `dprp compress --out DIR` or benchmarks/cifar10.py) or a dprp artifact")
    try:
        if parse_model_spec(path).kind not in ("run", "artifact"):
            raise ValueError(f"{path!r} is not a dprp run directory (run.json, checkpoint.pt) nor a dprp artifact")
        return run_model(path)
    except (OSError, ValueError) as exc:  # ModelSpecError too
        raise CaseError(f"{what} {path!r}: {exc}") from None


def parse_case(spec: str, timm_size: int):
    """(row name, builder) of one --case: cifar:resnet20:SCHEME:KEEP, timm:NAME:SCHEME:KEEP[:SIZE] or run:DIR.

    Everything is checked here, before any case is timed: the form, SCHEME, KEEP in (0, 1], SIZE, that timm
    knows NAME, and that DIR holds a loadable run (its model is loaded now and kept for the builder).

    Raises:
        CaseError: Naming the spec, what is wrong and the accepted forms.
    """
    kind, _, rest = spec.partition(":")
    parts = rest.split(":")
    if kind == "run" and rest:
        loaded = check_run(rest, f"--case {spec!r}: run directory")
        return f"run:{rest.rstrip('/')}", lambda: loaded  # the whole path: rows are often all "distill"
    if kind == "cifar" and len(parts) == 3:
        if parts[0] != "resnet20":
            raise CaseError(f"--case {spec!r}: only cifar:resnet20 is measured (got cifar:{parts[0]}); "
                            "for another trained model use run:DIR")
        scheme, keep = _scheme(spec, parts[1]), _keep(spec, parts[2])
        return f"resnet20 {scheme} {keep:g}", lambda: cifar_model(scheme, keep)
    if kind == "timm" and len(parts) in (3, 4):
        name, scheme, keep = parts[0], _scheme(spec, parts[1]), _keep(spec, parts[2])
        size = timm_size
        if len(parts) == 4:
            try:
                size = int(parts[3])
            except ValueError:
                size = 0
            if size < 1:
                raise CaseError(f"--case {spec!r}: SIZE {parts[3]!r} is not a positive image size in pixels "
                                "(e.g. 224)")
        check_timm_name(name, f"--case {spec!r}")
        return f"{name} {scheme} {keep:g}", lambda: timm_model(name, scheme, keep, size)
    raise CaseError(f"--case {spec!r}: {CASE_FORMS}")


def ort_session(model: nn.Module, example: torch.Tensor, threads: int, workdir: Path, tag: str):
    import onnxruntime as ort

    path = to_onnx(model, workdir / f"{tag}.onnx", example)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No busy-waiting threads after a run: they would steal the CPU from the next (eager) measurement.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, svd_model: nn.Module, size: tuple[int, ...], args, workdir: Path) -> list[dict]:
    """Rows of one model: every form at every batch size, eager and onnxruntime."""
    threads = torch.get_num_threads()
    rows = []
    one = torch.randn(1, *size)
    schemes = "+".join(sorted({layer.scheme for _, layer in svd_layers(svd_model)}))
    base = {"dense": export(svd_model, "dense"), "factorized": export(svd_model, "factorized")}
    for batch in args.batches:
        x = torch.randn(batch, *size)
        forms = dict(base)
        t0 = time.perf_counter()
        forms["auto"] = export(svd_model, "auto", objective="latency", example_inputs=x)
        auto_s = time.perf_counter() - t0
        eager_forms, eager_x = forms, x
        if args.channels_last:  # eager only; onnxruntime picks its own layouts
            eager_forms = {f: copy.deepcopy(m).to(memory_format=torch.channels_last) for f, m in forms.items()}
            eager_x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            eager = interleaved_medians([lambda m=m, x=eager_x: m(x) for m in eager_forms.values()], args.runs,
                                        args.warmup_s, args.min_block_s)
        ort: list = [None] * len(forms)
        if not args.skip_onnx:
            sessions = [ort_session(model, one, threads, workdir, f"{name}-{form}-{batch}")
                        for form, model in forms.items()]
            feeds = [{session.get_inputs()[0].name: x.numpy()} for session in sessions]
            ort = interleaved_medians([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)],
                                      args.runs, args.warmup_s, args.min_block_s)
            del sessions
        results = {}
        for (form, model), eager_s, ort_s in zip(forms.items(), eager, ort):
            s = summarize(model, one)
            n_fact = sum(1 for v in getattr(model, "_dprp_layers", {}).values() if v["form"] == "factorized")
            results[form] = {"model": name, "scheme": schemes, "form": form, "batch": batch,
                             "params": count_params(model),
                             "macs": s.macs, "eager_ms": 1000 * eager_s,
                             "ort_ms": None if ort_s is None else 1000 * ort_s, "factorized_layers": n_fact,
                             "layers": len(svd_layers(svd_model)), "auto_select_s": auto_s if form == "auto" else None,
                             "channels_last": args.channels_last}
            print(f"  {name} b{batch} {form:10s} eager {1000 * eager_s:9.2f} ms"
                  + ("" if ort_s is None else f"  ort {1000 * ort_s:9.2f} ms"), flush=True)
        for r in results.values():
            d = results["dense"]
            r["eager_vs_dense"] = r["eager_ms"] / d["eager_ms"]
            r["ort_vs_dense"] = (r["ort_ms"] / d["ort_ms"]) if r["ort_ms"] and d["ort_ms"] else None
            rows.append(r)
    return rows


def si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def markdown(rows: list[dict], models: dict[str, str], command: str) -> str:
    import onnxruntime
    import timm

    import dprp_surgery

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "CPU inference latency of exported compressed models (`benchmarks/latency.py`): the three forms of "
        "a row timed in interleaved rounds (one block of calls of about 20 ms per form per round), median over "
        f"{rows[0].get('runs', '?')} rounds of the per-call time after a warm-up (>= 2 calls and 0.5 s), PyTorch eager "
        "(`torch.inference_mode`) and "
        "onnxruntime (CPUExecutionProvider). `auto` = `export(mode='auto', objective='latency')` with the layer "
        "timings taken at the row's batch size; `x dense` = latency / dense latency in the same run (< 1 is faster).",
        "",
        f"- command: `{command}`",
        f"- machine: {cpu}, {os.cpu_count()} CPU cores visible (shared with other jobs), torch and onnxruntime "
        f"intra-op threads {torch.get_num_threads()}; absolute numbers are noisy, compare ratios within a run",
        "- eager memory format: " + ("channels_last (models and inputs; `auto` chose its layers in NCHW)"
                                     if rows[0].get("channels_last") else "NCHW (contiguous)"),
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, timm {timm.__version__}, dprp_surgery {dprp_surgery.__version__}",
    ]
    for name, desc in models.items():
        lines.append(f"- {name}: {desc}")
    lines += ["",
              "| model | form | batch | params | MACs/img | factorized layers | eager ms | x dense | ORT ms | "
              "x dense |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ort_ms = "-" if r["ort_ms"] is None else f"{r['ort_ms']:.2f}"
        ort_x = "-" if r["ort_vs_dense"] is None else f"{r['ort_vs_dense']:.2f}"
        lines.append(f"| {r['model']} | {r['form']} | {r['batch']} | {si(r['params'])} | {si(r['macs'])} | "
                     f"{r['factorized_layers']}/{r['layers']} | {r['eager_ms']:.2f} | {r['eager_vs_dense']:.2f} | "
                     f"{ort_ms} | {ort_x} |")
    lines += [""] + notes(rows)
    return "\n".join(lines) + "\n"


def notes(rows: list[dict]) -> list[str]:
    """How to read the table (generated from the rows, so a re-run keeps it true)."""
    out = ["Reading the table:", ""]
    same = sorted({f"{r['model']} batch {r['batch']}" for r in rows
                   if r["form"] == "auto" and r["factorized_layers"] == 0})
    if same:
        out.append(f"- auto kept every layer dense for {', '.join(same)}: that model is identical to dense, so its "
                   "'x dense' ratio is pure run-to-run noise of this shared machine and shows how far apart two "
                   "equal timings can land.")
    fast = [r for r in rows if r["form"] != "dense" and r["eager_vs_dense"] <= 1 / 1.3]
    if fast:
        out.append("- At least 1.3x faster than dense in eager mode: " + "; ".join(
            f"{r['model']} {r['form']} batch {r['batch']} ({1 / r['eager_vs_dense']:.2f}x"
            + (f", ORT {1 / r['ort_vs_dense']:.2f}x" if r["ort_vs_dense"] else "") + ")" for r in fast) + ".")
    else:
        out.append("- No form is 1.3x faster than dense in eager mode in this run.")
    slow = [r for r in rows if r["form"] == "factorized" and r["eager_vs_dense"] > 1 and "paper" in r["scheme"]]
    if slow:
        worst = max(slow, key=lambda r: r["eager_vs_dense"])
        out.append(f"- The all-factorized export with paper-scheme layers (grouped and depthwise convs always use that "
                   f"scheme) is slower than dense in eager mode in {len(slow)} of "
                   f"{sum(r['form'] == 'factorized' and 'paper' in r['scheme'] for r in rows)} rows (up to "
                   f"{worst['eager_vs_dense']:.1f}x, {worst['model']} batch {worst['batch']}) even where it has fewer "
                   "MACs: the paper scheme's realisation runs its k x k conv with r filters on the C (or S) channels "
                   "folded into the batch, producing C*r (or S*r) maps for a 1x1 conv, which is memory-bound on CPUs. "
                   "The channel and spatial schemes realise a layer as two ordinary convolutions.")
    auto = [r for r in rows if r["form"] == "auto" and r["factorized_layers"] > 0]
    if auto:
        out.append("- auto(latency) picks, per layer, the form that ran faster in eager mode at the row's batch "
                   "size, then keeps that mix, the all-dense or the all-factorized model, whichever runs fastest "
                   "as a whole: " + "; ".join(
                       f"{r['model']} batch {r['batch']}: {r['factorized_layers']}/{r['layers']} layers, eager "
                       f"{r['eager_vs_dense']:.2f}x" + (f", ORT {r['ort_vs_dense']:.2f}x" if r["ort_vs_dense"] else "")
                       for r in auto) + ". The choice is timed in PyTorch eager; onnxruntime fuses differently, "
                   "so its ratios need not follow.")
    return out


def write_section(path: Path, text: str) -> str:
    """Write the generated block `text` into the latency section of a markdown file, keeping everything else.

    The block sits between the START and END marker comments under the SECTION heading; only what lies between
    the markers is replaced, so hand-written text before or after them stays. A file without the section gets it
    appended (a missing file is created); a section without markers (written before they existed) gets the
    block right after its heading, with its old text kept below it. The file is replaced atomically.

    Args:
        path: The markdown file.
        text: The generated block (without the heading and the markers).

    Returns:
        A note for the user when the old text was kept beside the new block, else "".
    """
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    lines = old.rstrip("\n").splitlines()
    block = [START, *text.rstrip("\n").splitlines(), END]
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    note = ""
    if start is None:
        new_lines = [*lines, "", SECTION, "", *block] if old.strip() else [SECTION, "", *block]
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        first = next((i for i in range(start + 1, end) if lines[i].strip() == START), None)
        last = None if first is None else next((i for i in range(first + 1, end) if lines[i].strip() == END), None)
        if first is not None and last is not None:
            new_lines = lines[:first] + block + lines[last + 1:]
        else:
            new_lines = lines[:start + 1] + ["", *block] + lines[start + 1:]
            note = (f"note: the section {SECTION!r} of {path} had no {START} / {END} markers: the new table was "
                    "inserted after its heading and the old text kept below it; delete what is outdated by hand")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(new_lines) + "\n")
    return note


def cases(args) -> list[tuple[str, object]]:
    """(row name, builder) of every model to measure: the --case specs, else the single-model flags.

    Every spec, file and name is checked here, before anything is timed.

    Raises:
        CaseError: A spec, run directory, ranks file or timm name that cannot be measured.
    """
    if args.case:
        return [parse_case(spec, args.timm_size) for spec in args.case]
    if args.run_dir:
        loaded = check_run(args.run_dir, "--run-dir")
        first = ("resnet20", lambda: loaded)
    else:
        if args.ranks:
            check_ranks_file(args.ranks, args.scheme)
        first = ("resnet20", lambda: cifar_model(args.scheme, args.keep, args.ranks))
    if args.skip_timm:
        return [first]
    check_timm_name(args.timm, f"--timm {args.timm}")
    return [first, (args.timm, lambda: timm_model(args.timm, args.scheme, args.keep, args.timm_size))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=None,
                        help="fraction of every layer's rank kept, in (0, 1] (default 0.5; with --run-dir it applies "
                             "to the timm model only)")
    parser.add_argument("--ranks", help=f"ranks of the CIFAR ResNet-20: {RANKS_FORMATS} (not with --run-dir)")
    parser.add_argument("--run-dir", help="a dprp compress run directory (its model, at its trained ranks, replaces "
                                          "the CIFAR ResNet-20; not with --ranks)")
    parser.add_argument("--scheme", default="paper", choices=SCHEMES)
    parser.add_argument("--timm", default="convnext_atto", help="timm architecture (random init)")
    parser.add_argument("--timm-size", type=int, default=224)
    parser.add_argument("--skip-timm", action="store_true")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--runs", type=int, default=15, help="interleaved timing rounds per row (default 15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and onnxruntime intra-op threads (default 1: on a shared 2-core machine two "
                             "OpenMP threads stall for hundreds of ms whenever a neighbour takes a core)")
    parser.add_argument("--case", action="append", default=None, metavar="SPEC",
                        help="a model to measure, repeatable; replaces the flags above: cifar:resnet20:SCHEME:KEEP, "
                             "timm:NAME:SCHEME:KEEP[:SIZE] or run:DIR")
    parser.add_argument("--channels-last", action="store_true",
                        help="time the eager forms with models and inputs in channels_last memory format (oneDNN "
                             "then skips its per-call layout reorders; onnxruntime rows are unchanged)")
    parser.add_argument("--md", type=Path, default=None, help="markdown file to write the section into")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, not minutes (batch 1, 1 run, no warm-ups, timm model at 32 px): keeps the "
                             "script alive in tests; the timings mean nothing")
    args = parser.parse_args(argv)
    if args.keep is not None and not 0 < args.keep <= 1:
        parser.error(f"--keep {args.keep}: give the fraction of every layer's rank kept, in (0, 1] (e.g. 0.5)")
    if args.case:
        given = [flag for flag, value in (("--keep", args.keep), ("--ranks", args.ranks), ("--run-dir", args.run_dir))
                 if value is not None]
        if given:
            parser.error(f"--case replaces {', '.join(given)}: put the model into the --case spec instead "
                         "(cifar:resnet20:SCHEME:KEEP, run:DIR)")
    if args.run_dir and args.ranks:
        parser.error(f"--run-dir {args.run_dir} keeps the run's trained ranks: --ranks {args.ranks} would be ignored; "
                     "drop one of them")
    if args.run_dir and args.keep is not None:
        if args.skip_timm:
            parser.error(f"--run-dir {args.run_dir} keeps the run's trained ranks and --skip-timm drops the timm "
                         f"model: --keep {args.keep:g} would change nothing; drop --keep")
        print(f"note: --keep {args.keep:g} applies to the timm model only; the --run-dir model keeps its trained "
              "ranks", flush=True)
    args.keep = 0.5 if args.keep is None else args.keep
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: time at least 1 round (default 15)")
    if args.timm_size < 1:
        parser.error(f"--timm-size {args.timm_size}: give a positive image size in pixels (e.g. 224)")
    bad = [b for b in args.batches if b < 1]
    if bad:
        parser.error(f"--batches {bad[0]}: every batch size must be at least 1")
    args.warmup_s, warm_up_s, args.min_block_s = 0.5, 5.0, 0.02
    if args.smoke:
        if args.md:
            parser.error("--smoke timings mean nothing: do not write them into --md")
        args.batches, args.runs, args.warmup_s, warm_up_s = [1], 1, 0.0, 0.0
        args.min_block_s = 0.0
        if args.timm_size == parser.get_default("timm_size"):
            args.timm_size = 32
    for flag, path in (("--md", args.md), ("--json", args.json)):
        if path is not None:
            if path.is_dir():
                parser.error(f"{flag} {path} is a directory: give a file path")
            try:
                check_writable(path, flag)  # before minutes of timing
            except ValueError as exc:
                parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        measured = cases(args)  # every case is checked before anything is timed
    except CaseError as exc:
        parser.error(str(exc))
    command = "python benchmarks/latency.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                 else sys.argv[1:]))
    t0 = time.perf_counter()
    warm_up_process(warm_up_s)
    rows: list[dict] = []
    models: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in measured:
            model, size, desc = build()
            models[name] = desc
            print(f"{name}: {desc}", flush=True)
            rows += bench_model(name, model, size, args, Path(tmp))
    for r in rows:
        r["runs"] = args.runs
    text = markdown(rows, models, command.strip())
    text += f"\nTotal wall time of the benchmark: {time.perf_counter() - t0:.0f} s.\n"
    print()
    print(SECTION + "\n")
    print(text)
    if args.md:
        note = write_section(args.md, text)
        print(f"wrote the section to {args.md}")
        if note:
            print(note)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
