"""The benchmark scripts run to completion in their --smoke modes."""

from __future__ import annotations

import json
import math
import re
import runpy
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from dprp_surgery import load_model
from dprp_surgery.surgery import svd_layers

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_main(name: str, argv: list[str]):
    """Call benchmarks/NAME's main(argv) on one thread (the scripts may change the thread count)."""
    main = runpy.run_path(str(BENCHMARKS / name), run_name=f"benchmark_{Path(name).stem}")["main"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_cifar10_smoke(shared_dir, tmp_path, capsys, caplog):
    """The docstring's workflow: the dense (and other) rows first, then the distill row in a second command with
    the same --out, distilling from the dense row; the table keeps the rows of both commands."""
    rows = ["dense", "paper2", "tuned", "distill"]
    flags = ["--smoke", "--quiet", "--out", str(tmp_path), "--target-compression", "0.3",
             "--sigma-lr-scale", "5", "--scheme", "channel", "--min-rank", "2", "--no-structure-when-frozen",
             "--factor-step", "capped", "--epsilon-start", "0.01", "--epsilon-ramp-epochs", "2"]
    first, second = [*flags, "--rows", *rows[:3]], [*flags, "--rows", "distill"]
    assert run_main("cifar10.py", first) == 0
    assert run_main("cifar10.py", second) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["command"] for r in results] == [f"python benchmarks/cifar10.py {shlex.join(first)}"] * 3 + [
        f"python benchmarks/cifar10.py {shlex.join(second)}"]
    # the distill row learns from the dense row's fine-tuned model, written by the first command
    assert results[3]["teacher"] == str(tmp_path / "resnet20" / "dense" / "model")
    assert results[3]["config"]["distill"] == 0.5 and results[2]["config"]["distill"] == 0.0
    assert [r["config"]["target_compression"] for r in results] == [None, None, 0.3, 0.3]
    assert [r["config"]["sigma_lr_scale"] for r in results] == [1.0, 5.0, 10.0, 10.0]
    assert [r["config"]["scheme"] for r in results] == ["paper", "paper", "channel", "channel"]
    assert [r["config"]["min_rank"] for r in results] == [1, 1, 2, 2]
    assert [r["config"]["structure_when_frozen"] for r in results] == [True, True, False, False]
    assert [r["config"]["factor_step"] for r in results] == ["plain", "plain", "capped", "capped"]
    assert [r["config"]["epsilon_start"] for r in results] == [None, None, 0.01, 0.01]
    assert [r["config"]["epsilon_ramp_epochs"] for r in results] == [0, 0, 2, 2]
    assert [r["row"] for r in results] == rows and all(r["model"] == "resnet20" for r in results)
    for r in results:
        assert 0 <= r["top1"] <= 100 and 0 <= r["top5"] <= 100
        assert isinstance(r["params_removed"], float) and r["params"] > 0
    assert results[0]["params_removed"] == 0.0 and results[0]["ranks"] == {}  # dense stays dense
    assert all(len(r["ranks"]) == 20 for r in results[1:])  # every conv and the classifier factorized
    md = (tmp_path / "RESULTS.md").read_text()
    assert "256 train / 128 test images" in md and all(f"| resnet20 | {row} |" in md for row in rows)
    assert re.search(r"^\| resnet20 \| distill \| [\d.]+ \| [+-][\d.]+ \|", md, flags=re.M), md  # a delta to dense
    assert md.splitlines()[0].endswith(f"command: python benchmarks/cifar10.py {shlex.join(second)}")
    assert "Rows from another command than the header's" in md
    assert all(f"- resnet20 {row}: `python benchmarks/cifar10.py {shlex.join(first)}`" in md for row in rows[:3])
    assert "- resnet20 distill:" not in md
    # --smoke drops the tuned preset's cool-down and prunes every step: the one short epoch compresses
    assert "cool-down" not in caplog.text, caplog.text
    for r in results[2:]:
        full = json.loads((tmp_path / "resnet20" / r["row"] / "run.json").read_text())["full_ranks"]
        assert sum(r["ranks"].values()) < sum(full.values()), r["row"]
        assert r["config"]["reg_cooldown_epochs"] == 0 and r["config"]["prune_every"] == 1
    for r in results:  # the shipped (auto, params) export is never larger than dense nor than the factorized model
        assert r["shipped_params_removed"] >= max(0.0, r["params_removed"]) - 1e-9
    assert results[0]["shipped_params_removed"] == 0.0
    for row, r in zip(rows, results):
        run_dir = tmp_path / "resnet20" / row
        assert (run_dir / "history.jsonl").is_file() and (run_dir / "model" / "manifest.json").is_file()
        trained, arch = load_model(run_dir)  # every row is a dprp run directory (dense rows included)
        assert arch == "cifar:resnet20"
        assert {n: m.rank for n, m in svd_layers(trained)} == r["ranks"]
        full = json.loads((run_dir / "run.json").read_text())["full_ranks"]  # initial ranks for `dprp report`
        assert full == {n: m.full_rank for n, m in svd_layers(trained)} and len(full) == len(r["ranks"])
        shipped, _ = load_model(run_dir / "model")
        assert sum(p.numel() for p in shipped.parameters()) == r["shipped_params"]
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(shipped.eval()(x), trained.eval()(x), rtol=1e-4, atol=1e-4)
    (tmp_path / "resnet20" / "dense" / "run.json").unlink()  # as in tables written before rows carried run.json
    assert run_main("cifar10.py", ["--rescore", "--out", str(tmp_path)]) == 0
    rescored = json.loads((tmp_path / "results.json").read_text())
    assert [r["shipped_params"] for r in rescored] == [r["shipped_params"] for r in results]
    assert (tmp_path / "RESULTS.md").read_text() == md  # same rows, same notes on their commands


def test_train_step_smoke(capsys):
    run_main("train_step.py", ["--smoke", "--model-only", "--schemes", "paper", "channel"])
    out = capsys.readouterr().out
    assert "batch 8" in out and "median of 1 steps after 1 warm-up" in out
    table = re.findall(r"^\| (.+?) \| ([\d.-]+) \| ([\d.]+) \| ([\d.]+) \|$", out, flags=re.M)
    assert [t[0] for t in table] == ["dense", "paper", "paper (model only)", "paper pruned", "channel",
                                     "channel (model only)", "channel pruned"]
    assert all(float(t[2]) > 0 for t in table)
    assert re.search(r"^\| paper pruned \| [\d.]+ \| [\d.]+ \| [\d.]+% \|$", out, flags=re.M), out
    run_main("train_step.py", ["--smoke", "--schemes", "paper", "--profile", "paper", "--rows", "3"])
    assert "profile of one step: paper" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "models"), [(["--skip-timm"], ["resnet20"]),
                                               (["--skip-onnx", "--channels-last"], ["resnet20", "convnext_atto"])],
                         ids=["onnx", "timm"])
def test_latency_smoke(flags, models, tmp_path, capsys):
    """Two halves of one --smoke run (the ONNX exports take most of the time): ResNet-20 with onnxruntime; both
    models (the timm one at 32 px) in eager mode only."""
    pytest.importorskip("onnxruntime")
    assert run_main("latency.py", ["--smoke", *flags, "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["model"], r["form"], r["batch"]) for r in rows] == [
        (m, f, 1) for m in models for f in ("dense", "factorized", "auto")]
    assert all(r["eager_ms"] > 0 for r in rows) and all(r["factorized_layers"] <= r["layers"] for r in rows)
    assert all((r["ort_ms"] is None) == ("--skip-onnx" in flags) for r in rows)
    assert all(r["channels_last"] == ("--channels-last" in flags) for r in rows)
    out = capsys.readouterr().out
    assert "## Inference latency (issue 4)" in out and ("timm:convnext_atto at 32px" in out) == ("--skip-onnx" in flags)
    assert ("eager memory format: channels_last" in out) == ("--channels-last" in flags)
    with pytest.raises(SystemExit):  # smoke timings never go into the docs
        run_main("latency.py", ["--smoke", "--md", str(tmp_path / "bench.md")])
    assert not (tmp_path / "bench.md").exists()


def test_latency_cases(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    args = ["--smoke", "--skip-onnx", "--case", "cifar:resnet20:channel:0.25", "--json", str(tmp_path / "rows.json")]
    assert run_main("latency.py", args) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["model"] for r in rows} == {"resnet20 channel 0.25"} and {r["scheme"] for r in rows} == {"channel"}
    auto = next(r for r in rows if r["form"] == "auto")
    assert auto["params"] > 0 and auto["layers"] == 20
    refused("latency.py", ["--smoke", "--case", "timm:resnet18"], capsys, "--case 'timm:resnet18'",
            "timm:NAME:SCHEME:KEEP[:SIZE]")


@pytest.mark.parametrize("scheme", ["paper", "channel", "spatial"])
def test_truncation_error_is_the_eckart_young_error(scheme, capsys):
    """Each layer's reported error is ||W - W_k||^2 / ||W||^2 of the truncated model, at the largest rank that fits."""
    from dprp_surgery.models import resnet20

    bench = runpy.run_path(str(BENCHMARKS / "truncation_error.py"), run_name="benchmark_truncation_error")
    torch.manual_seed(0)
    model = resnet20().eval()
    (row,) = bench["truncation_rows"](model, scheme, [0.35])
    small = bench["truncated"](model, scheme, 0.35)
    dense = dict(model.named_modules())
    layers = dict(svd_layers(small))
    assert [x["name"] for x in row["layers"]] == list(layers)
    for entry in row["layers"]:
        layer, weight = layers[entry["name"]], dense[entry["name"]].weight.detach().double()
        h, w = layer.matrix_shape
        assert layer.rank == entry["rank"] and entry["rank"] * (h + w + 1) <= max(0.35 * h * w, h + w + 1)
        assert entry["rank"] == entry["full_rank"] or (entry["rank"] + 1) * (h + w + 1) > 0.35 * h * w
        expected = float(((weight - layer.dense_weight().detach().double()) ** 2).sum() / (weight ** 2).sum())
        assert entry["error"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert 0 < row["error"] < 1
    assert bench["main"](["--model", "cifar:resnet20", "--keep", "0.5", "--schemes", scheme]) == 0
    assert f"| {scheme} | 0.5 |" in capsys.readouterr().out


def test_sweep_runs_each_entry(shared_dir, tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"dense": {"dense": True, "epochs": 1, "batch_size": 32},
                                 "dprp": {"epochs": 1, "batch_size": 32, "factor_lr_scale": 0.05,
                                          "lambda_comp": 5.0, "epsilon": 0.3}}))
    assert run_main("sweep.py", [str(sweep), "--train-limit", "64", "--test-limit", "40"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["name"] for r in lines] == ["dense", "dprp"]
    assert lines[0]["removed"] == 0.0 and lines[0]["ranks"] == [] and len(lines[1]["ranks"]) == 20
    assert all(len(r["val"]) == 1 and 0 <= r["val"][0] <= 100 for r in lines)


def exits_2(name: str, argv: list[str], capsys, *words: str) -> str:
    """Run benchmarks/NAME with bad input: exit 2 and a one-line message holding `words`, no traceback."""
    with pytest.raises(SystemExit) as exc:
        run_main(name, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), (words, err)
    return err


def image_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    """A tiny train/ + val/ ImageFolder of 32x32 PNGs, far below the scripts' default limits."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def weights(tmp_path) -> Path:
    """A random-init CIFAR ResNet-20 state dict, standing in for the pretrained file."""
    from dprp_surgery.models import resnet20

    path = tmp_path / "r20.th"
    torch.save(resnet20().state_dict(), path)
    return path


def test_sweep_reports_unreadable_file(tmp_path, capsys):
    exits_2("sweep.py", [str(tmp_path / "missing.json")], capsys, "cannot read sweep file", "missing.json")


@pytest.mark.parametrize(("entries", "words"), [
    ({"x": {"epochz": 1}}, ("run 'x'", "unknown DPRPConfig field 'epochz'", "epochs")),
    ({"x": {"epochs": 0}}, ("run 'x'", "epochs")),
    ({"x": {"seed": 3}}, ("run 'x'", "seed", "--seed")),
    ({"x": [1]}, ("run 'x'", "DPRPConfig overrides")),
    ({"x": {"exclude": ["*"]}}, ("run 'x'", "exclude")),
    ([], ("non-empty JSON object",)),
], ids=["unknown-field", "bad-value", "fixed-field", "not-an-object", "nothing-to-factorize", "not-a-dict"])
def test_sweep_bad_file_exits_2_before_training(entries, words, tmp_path, weights, capsys, monkeypatch):
    from dprp_surgery.trainer import DPRPTrainer

    monkeypatch.setattr(DPRPTrainer, "fit", lambda self: pytest.fail("a run trained"))
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(entries))
    exits_2("sweep.py", [str(sweep), "--weights", str(weights), "--data", str(image_folder(tmp_path / "d"))],
            capsys, str(sweep), *words)


def test_sweep_bad_data_and_weights_exit_2(tmp_path, weights, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"x": {"epochs": 1}}))
    exits_2("sweep.py", [str(sweep), "--weights", str(weights), "--data", str(tmp_path / "nodata")], capsys,
            "--data", "nodata", "does not exist")
    exits_2("sweep.py", [str(sweep), "--weights", str(tmp_path / "nope.th"), "--data", str(tmp_path)], capsys,
            "--weights", "nope.th", "does not exist")


def test_sweep_default_limits_clamp_to_a_small_dataset(tmp_path, weights, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"dense": {"dense": True, "epochs": 1, "batch_size": 8}}))
    data = image_folder(tmp_path / "d")  # 6 train / 6 val images: below --train-limit 10000 / --test-limit 2000
    assert run_main("sweep.py", [str(sweep), "--weights", str(weights), "--data", str(data)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert line["name"] == "dense" and len(line["val"]) == 1


def test_truncation_error_bad_input_exits_2(tmp_path, capsys):
    exits_2("truncation_error.py", ["--model", f"cifar:resnet20@{tmp_path / 'nope.th'}"], capsys,
            "--model", "nope.th", "does not exist")
    exits_2("truncation_error.py", ["--model", "timm:no_such_net"], capsys, "--model", "unknown timm model")
    exits_2("truncation_error.py", ["--model", "cifar:resnet20", "--data", str(tmp_path / "nodata")], capsys,
            "--data", "nodata")


def test_truncation_error_default_test_limit_clamps_to_a_small_dataset(tmp_path, capsys):
    data = image_folder(tmp_path / "d")  # 6 test images, below --test-limit 2000
    args = ["--model", "cifar:resnet20", "--keep", "0.5", "--schemes", "paper", "--data", str(data)]
    assert run_main("truncation_error.py", args) == 0
    out = capsys.readouterr().out
    assert "dense top-1 on 6 test images" in out and re.search(r"^\| paper \| 0.5 \| [\d.]+ \| .* \| [\d.]+ \|$", out,
                                                                 flags=re.M), out


def test_factorize_time_smoke(capsys):
    assert run_main("factorize_time.py", ["--models", "test_vit3", "--schemes", "channel", "--repeats", "1"]) == 0
    assert re.search(r"^\| test_vit3 \| channel \| [\d.]+ \| [\d.]+ \| \d+x \|$", capsys.readouterr().out, flags=re.M)


def test_factorize_time_bad_input_exits_2(capsys):
    exits_2("factorize_time.py", ["--models", "resnet5", "--repeats", "1"], capsys,
            "--models", "unknown timm model 'resnet5'", "resnet50")
    exits_2("factorize_time.py", ["--models", "resnet18", "--repeats", "0"], capsys, "--repeats")


def test_cifar10_resume_continues_an_interrupted_row(shared_dir, tmp_path, stop_in_epoch):
    base = ["--quiet", "--rows", "tuned", "--epochs", "2", "--train-limit", "64", "--test-limit", "32",
            "--batch-size", "16", "--lambda-comp", "20"]
    assert run_main("cifar10.py", [*base, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())[0]

    stop_in_epoch(1)  # the machine goes away during the second epoch
    with pytest.raises(KeyboardInterrupt):
        run_main("cifar10.py", [*base, "--out", str(tmp_path / "cut")])
    stop_in_epoch(None)
    assert run_main("cifar10.py", [*base, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())[0]
    assert resumed["resumed_at_epoch"] == 1 and "resumed_at_epoch" not in whole
    assert resumed["ranks"] == whole["ranks"] and resumed["params"] == whole["params"]
    assert resumed["top1"] == whole["top1"] and resumed["top5"] == whole["top5"]
    history = [json.loads(line) for line in (tmp_path / "cut" / "resnet20" / "tuned" / "history.jsonl").open()]
    assert [h["epoch"] for h in history] == [0, 1]


def _paired_stats():
    return runpy.run_path(str(BENCHMARKS / "paired.py"), run_name="benchmark_paired")["paired_stats"]


def test_paired_stats_by_hand():
    stats = _paired_stats()
    base = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    model = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    r = stats(base, model, band=0.5)
    # b = 3 (images 1, 5, 8: baseline only), c = 1 (image 4: model only)
    assert (r["n"], r["b"], r["c"]) == (10, 3, 1)
    assert r["base_top1"] == pytest.approx(70.0) and r["model_top1"] == pytest.approx(50.0)
    assert r["diff"] == pytest.approx(-20.0)
    assert r["se"] == pytest.approx(100 * (4 - 4 / 10) ** 0.5 / 10)  # sqrt(b + c - (b - c)^2 / n) / n
    assert r["ci95"] == pytest.approx([-20 - 1.96 * r["se"], -20 + 1.96 * r["se"]])
    assert r["p_mcnemar"] == pytest.approx(2 * (1 + 4) / 16)  # 2 P(X <= 1), X ~ Bin(4, 1/2)
    assert r["verdict"] == "undecided"  # the interval crosses -0.5
    assert stats(base, model, band=100.0)["verdict"] == "inside"


def test_paired_stats_outside_and_identical():
    stats = _paired_stats()
    base = torch.ones(1000, dtype=torch.bool)
    model = base.clone()
    model[:100] = False  # b = 100, c = 0
    r = stats(base, model, band=5.0)
    assert r["diff"] == pytest.approx(-10.0) and r["se"] == pytest.approx(100 * 90 ** 0.5 / 1000)
    assert r["verdict"] == "outside" and r["p_mcnemar"] == pytest.approx(2 / 2 ** 100)
    same = stats(base, base.clone(), band=0.5)
    assert (same["diff"], same["se"], same["p_mcnemar"], same["verdict"]) == (0.0, 0.0, 1.0, "inside")
    assert "band" not in stats(base, model)
    with pytest.raises(ValueError, match="equal, non-empty"):
        stats(base, model[:10])


@pytest.mark.parametrize("b, c, want", [(512, 512, 1.0), (600, 500, None), (0, 1025, 2 / 2 ** 1025)])
def test_paired_stats_exact_p_for_many_disagreements(b, c, want):
    from fractions import Fraction

    stats = _paired_stats()
    n = 10_000
    base = torch.zeros(n, dtype=torch.bool)
    model = torch.zeros(n, dtype=torch.bool)
    base[:b] = True  # only the baseline right
    model[b:b + c] = True  # only the model right
    r = stats(base, model)
    assert (r["b"], r["c"]) == (b, c)
    exact = min(Fraction(1), Fraction(2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)), 2 ** (b + c)))
    assert r["p_mcnemar"] == pytest.approx(float(exact), rel=1e-12)
    if want is not None:
        assert r["p_mcnemar"] == pytest.approx(want, rel=1e-12)


def test_paired_smoke(shared_dir, cifar10_dir, tmp_path, capsys):
    import shutil

    for split in ("train", "test"):  # a small ImageFolder: 8 test images per class
        for cls in sorted(p.name for p in (cifar10_dir / "test").iterdir()):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for f in sorted((cifar10_dir / "test" / cls).iterdir())[:8]:
                shutil.copy(f, tmp_path / "data" / split / cls / f.name)
    weights = shared_dir / "models" / "cifar10_resnet20.th"
    args = ["--data", str(tmp_path / "data"), "--baseline", f"cifar:resnet20@{weights}", "--model", "cifar:resnet20",
            "--band", "0.5", "--json"]
    assert run_main("paired.py", args) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["n"] == 80 and row["arch"] == "cifar:resnet20"
    assert row["diff"] == pytest.approx(row["model_top1"] - row["base_top1"])
    assert row["base_top1"] > 50 and row["verdict"] == "outside"  # pretrained against random init
    assert run_main("paired.py", args[:-1]) == 0
    assert "| cifar:resnet20 |" in capsys.readouterr().out


def test_cifar10_init_from_a_dense_artifact(tmp_path):
    from argparse import Namespace

    from dprp_surgery import factorize, save
    from dprp_surgery.models import resnet20

    initial = runpy.run_path(str(BENCHMARKS / "cifar10.py"), run_name="benchmark_cifar10")["initial"]
    torch.manual_seed(0)
    source = resnet20()
    save(source, tmp_path / "dense", arch="cifar:resnet20")
    args = Namespace(init=tmp_path / "dense", weights_dir=None, from_scratch=True)
    started = initial("resnet20", args)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(started.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="is not a CIFAR resnet32"):
        initial("resnet32", args)
    save(factorize(source), tmp_path / "factorized", arch="cifar:resnet20")
    with pytest.raises(ValueError, match="is a factorized model: give a dense artifact"):
        initial("resnet20", Namespace(init=tmp_path / "factorized", weights_dir=None, from_scratch=True))
    with pytest.raises(ValueError, match="does not exist"):
        initial("resnet20", Namespace(init=tmp_path / "missing", weights_dir=None, from_scratch=True))


def dense_run_dir(path: Path, model: torch.nn.Module) -> Path:
    """A run directory as the dense row of cifar10.py leaves it: run.json and the exported model/."""
    from dprp_surgery import save

    save(model, path / "model", arch="cifar:resnet20")
    (path / "run.json").write_text(json.dumps({"format": "dprp-run", "arch": "cifar:resnet20", "num_classes": 10,
                                               "status": "done"}))
    return path


def test_cifar10_init_and_teacher_take_a_run_directory(tmp_path):
    """--init and --teacher take a run directory too (as paired.py, latency.py run: and `dprp eval` do)."""
    from argparse import Namespace

    from dprp_surgery.models import resnet20

    bench = runpy.run_path(str(BENCHMARKS / "cifar10.py"), run_name="benchmark_cifar10")
    torch.manual_seed(0)
    source = resnet20()
    run_dir = dense_run_dir(tmp_path / "run" / "resnet20" / "dense", source)
    started = bench["initial"]("resnet20", Namespace(init=run_dir, weights_dir=None, from_scratch=True))
    teacher, where = bench["teacher_for"]("resnet20", Namespace(teacher=run_dir, out=tmp_path / "out"))
    assert where == str(run_dir)
    for model in (started, teacher):
        for key, value in source.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def refused(name: str, argv: list[str], capsys, *words: str):
    """Run benchmarks/NAME with bad input: argparse's exit 2 with `words` in its error line, no traceback.

    Returns:
        What the run printed (capsys's captured out and err).
    """
    with pytest.raises(SystemExit) as exc:
        run_main(name, argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    last = captured.err.strip().splitlines()[-1]
    assert "error: " in last and all(w in last for w in words), (words, captured.err)
    return captured


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any cifar10.py row starts training."""
    from dprp_surgery.trainer import DPRPTrainer

    monkeypatch.setattr(DPRPTrainer, "fit", lambda self: pytest.fail("a row trained"))


@pytest.mark.parametrize(("flags", "words"), [
    (["--data", "/nothere"], ("--data /nothere does not exist", "cifar10:DIR")),
    (["--rows", "dense", "distill", "--teacher", "TMP/typo"], ("--teacher", "typo", "does not exist")),
    (["--rows", "dense", "distill", "--teacher", "TMP"], ("--teacher", "is neither a dprp artifact")),
    (["--init", "TMP/typo"], ("--init", "typo", "does not exist")),
    (["--init", "TMP"], ("--init", "is neither a dprp artifact")),
    (["--weights-dir", "TMP"], ("pretrained weights", "cifar10_resnet20.th not found", "--weights-dir")),
    (["--models", "resnet20", "resnet32", "--weights-dir", "TMP/w"], ("cifar10_resnet32.th not found",)),
    (["--epsilon-start", "0.01"], ("--epsilon-start 0.01 needs --epsilon-ramp-epochs",)),
], ids=["data", "teacher-missing", "teacher-not-a-model", "init-missing", "init-not-a-model", "weights",
        "weights-of-the-second-model", "epsilon-start-alone"])
def test_cifar10_bad_input_exits_2_before_any_row_trains(flags, words, tmp_path, capsys, no_training):
    from dprp_surgery.models import resnet20

    (tmp_path / "w").mkdir()
    torch.save(resnet20().state_dict(), tmp_path / "w" / "cifar10_resnet20.th")  # only resnet32's file is missing
    flags = [f.replace("TMP", str(tmp_path)) for f in flags]
    refused("cifar10.py", ["--smoke", "--quiet", "--out", str(tmp_path / "out"), *flags], capsys,
            *(w.replace("TMP", str(tmp_path)) for w in words))


def test_cifar10_epsilon_ramp_needs_a_start(capsys):
    with pytest.raises(SystemExit) as exc:
        run_main("cifar10.py", ["--smoke", "--epsilon-ramp-epochs", "3"])
    assert exc.value.code == 2
    assert "--epsilon-ramp-epochs needs --epsilon-start" in capsys.readouterr().err


def _small_folder(cifar10_dir: Path, dest: Path, per_class: int) -> Path:
    """A train/ + test/ ImageFolder of `per_class` CIFAR-10 test images per class in each split."""
    import shutil

    for split in ("train", "test"):
        for cls in sorted(p.name for p in (cifar10_dir / "test").iterdir()):
            (dest / split / cls).mkdir(parents=True)
            for f in sorted((cifar10_dir / "test" / cls).iterdir())[:per_class]:
                shutil.copy(f, dest / split / cls / f.name)
    return dest


def test_eval_benchmarks_decode_only_the_test_images_they_use(cifar10_dir, tmp_path, decode_counter, capsys):
    data = _small_folder(cifar10_dir, tmp_path / "data", 4)  # 40 images per split
    assert run_main("paired.py", ["--data", str(data), "--baseline", "cifar:resnet20", "--model", "cifar:resnet20",
                                  "--limit", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["n"] == 20
    assert decode_counter == [20]  # only the 20 kept test images: the training split is not used
    decode_counter.clear()
    assert run_main("truncation_error.py", ["--model", "cifar:resnet20", "--keep", "0.5", "--schemes", "paper",
                                            "--data", str(data), "--test-limit", "10"]) == 0
    assert "dense top-1 on 10 test images" in capsys.readouterr().out
    assert decode_counter == [10]


def test_training_benchmarks_decode_only_their_subsets(cifar10_dir, tmp_path, monkeypatch, decode_counter):
    from dprp_surgery import data as data_module

    data = _small_folder(cifar10_dir, tmp_path / "data", 4)
    seen, real_open = [], data_module.open_data

    class Opened(Exception):
        pass

    def stop_after_open(*args, **kwargs):  # the loading is what is checked here, not the training after it
        seen.append(real_open(*args, **kwargs))
        raise Opened

    monkeypatch.setattr(data_module, "open_data", stop_after_open)
    for script, argv in (("cifar10.py", ["--data", str(data), "--train-limit", "20", "--test-limit", "10", "--quiet",
                                         "--out", str(tmp_path / "out"), "--rows", "dense"]),
                         ("sweep.py", ["--data", str(data), "--train-limit", "20", "--test-limit", "10",
                                       str(BENCHMARKS / "sweeps" / "01_factor_lr.json")])):
        with pytest.raises(Opened):
            run_main(script, argv)
    assert [(len(train), len(test)) for train, test in seen] == [(20, 10), (20, 10)]
    assert decode_counter == [20, 10]  # the second script loads both subsets from the first one's cache


def test_cifar10_rescore_without_results_exits_2(tmp_path, capsys):
    refused("cifar10.py", ["--rescore", "--out", str(tmp_path)], capsys, "--rescore", str(tmp_path),
            "no results.json")


def cifar10_main(monkeypatch, tmp_path):
    """cifar10.py's main with the data and the rows faked: returns (main, the (args, base config) of every row)."""
    bench = runpy.run_path(str(BENCHMARKS / "cifar10.py"), run_name="benchmark_cifar10")
    main, calls = bench["main"], []

    def fake_row(row, model_name, args, train_ds, test_ds, base):
        calls.append((args, base))
        return {"model": model_name, "row": row, "top1": 90.0 if row == "dense" else 88.0, "top5": 99.0,
                "params": 1, "dense_params": 1, "params_removed": 0.0, "macs": 1, "dense_macs": 1,
                "macs_removed": 0.0, "ranks": {}, "wall_s": 1.0, "command": getattr(args, "command", None)}

    monkeypatch.setitem(main.__globals__, "run_row", fake_row)
    monkeypatch.setitem(main.__globals__, "open_data", lambda *a, **k: ([0] * 8, [0] * 4))
    return main, calls


@pytest.mark.parametrize(("flags", "lr"), [([], 0.01), (["--from-scratch"], 0.1), (["--from-scratch", "--lr", "0.01"],
                                                                                     0.01), (["--lr", "0.05"], 0.05)])
def test_cifar10_lr_default_depends_on_the_mode(flags, lr, tmp_path, monkeypatch, capsys):
    main, calls = cifar10_main(monkeypatch, tmp_path)
    weights = tmp_path / "w"
    weights.mkdir()
    from dprp_surgery.models import resnet20

    torch.save(resnet20().state_dict(), weights / "cifar10_resnet20.th")
    assert main(["--data", str(tmp_path), "--weights-dir", str(weights), "--rows", "dense", "--out",
                 str(tmp_path / "out"), "--quiet", *flags]) == 0
    ((_, base),) = calls
    assert base.lr == lr
    assert f"lr {lr} cosine" in (tmp_path / "out" / "RESULTS.md").read_text()


def test_cifar10_merges_rows_with_the_earlier_results(tmp_path, monkeypatch, capsys):
    """A second command with the same --out keeps the first one's rows; a row run again replaces its entry."""
    main, _ = cifar10_main(monkeypatch, tmp_path)
    out = tmp_path / "out"
    common = ["--data", str(tmp_path), "--from-scratch", "--quiet", "--out", str(out)]
    assert main([*common, "--rows", "tuned", "dense"]) == 0
    (out / "results.json").write_text(json.dumps(json.loads((out / "results.json").read_text())
                                                 + [{**json.loads((out / "results.json").read_text())[0],
                                                     "row": "l1", "command": None}]))
    assert main([*common, "--rows", "distill", "tuned", "--resume"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in results] == ["dense", "tuned", "distill", "l1"]  # the order of ALL_ROWS
    first = f"python benchmarks/cifar10.py {shlex.join([*common, '--rows', 'tuned', 'dense'])}"
    second = f"python benchmarks/cifar10.py {shlex.join([*common, '--rows', 'distill', 'tuned', '--resume'])}"
    assert [r["command"] for r in results] == [first, second, second, None]
    md = (out / "RESULTS.md").read_text()
    assert f"- resnet20 dense: `{first}`" in md and "- resnet20 l1: an earlier run (its command was not recorded)" in md
    assert "- resnet20 tuned" not in md and "| resnet20 | distill | 88.00 | -2.00 |" in md
    (out / "results.json").write_text("{")
    with pytest.raises(SystemExit) as exc:
        main([*common, "--rows", "dense", "--resume"])
    assert exc.value.code == 2 and "results.json" in capsys.readouterr().err


def test_cifar10_smoke_with_epochs_notes_the_override(tmp_path, monkeypatch, capsys):
    main, calls = cifar10_main(monkeypatch, tmp_path)
    assert main(["--smoke", "--epochs", "5", "--data", str(tmp_path), "--from-scratch", "--rows", "dense",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert "note: --smoke trains 1 epoch; --epochs 5 is ignored" in capsys.readouterr().out
    assert calls[0][1].epochs == 1


def test_cifar10_results_are_written_atomically(tmp_path, monkeypatch):
    """results.json and RESULTS.md are replaced through a temporary file in the same folder (os.replace)."""
    import os

    main, _ = cifar10_main(monkeypatch, tmp_path)
    replaced, real_replace = [], os.replace

    def spy(src, dst):
        replaced.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "out"
    assert main(["--data", str(tmp_path), "--from-scratch", "--rows", "dense", "--out", str(out), "--quiet"]) == 0
    assert {dst for _, dst in replaced} == {out / "results.json", out / "RESULTS.md"}
    assert all(src.parent == dst.parent and src != dst and not src.exists() for src, dst in replaced)


def test_latency_md_replaces_only_the_generated_block(tmp_path, monkeypatch, capsys):
    """--md keeps the hand-written analysis after the table of docs/benchmarks.md (the generated text sits
    between marker comments) and replaces the file atomically."""
    import os

    bench = runpy.run_path(str(BENCHMARKS / "latency.py"), run_name="benchmark_latency")
    start, end, section = bench["START"], bench["END"], bench["SECTION"]
    docs = (BENCHMARKS.parent / "docs" / "benchmarks.md").read_text()
    before, rest = docs.split(start + "\n")
    generated, after = rest.split(end + "\n")
    assert before.endswith(section + "\n\n") and generated.startswith("CPU inference latency of exported")
    assert generated.endswith("Total wall time of the benchmark: 506 s.\n")
    assert "Where this leaves the target" in after and "\n## " in after  # the analysis, then later sections
    md = tmp_path / "benchmarks.md"
    md.write_text(docs)
    replaced, real_replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst)), real_replace(src, dst)))
    assert bench["write_section"](md, "NEW TABLE\n\nTotal wall time of the benchmark: 1 s.\n") == ""
    assert md.read_text() == f"{before}{start}\nNEW TABLE\n\nTotal wall time of the benchmark: 1 s.\n{end}\n{after}"
    assert replaced == [md] and [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]

    # a section written before the markers: the new block goes after the heading, the old text stays below it
    old = f"# Benchmarks\n\n{section}\n\nold table\n\nanalysis\n\n## Next\n\nkept\n"
    md.write_text(old)
    note = bench["write_section"](md, "NEW\n")
    assert "had no" in note and "old text kept" in note
    assert md.read_text() == (f"# Benchmarks\n\n{section}\n\n{start}\nNEW\n{end}\n\nold table\n\nanalysis\n\n"
                              "## Next\n\nkept\n")
    assert bench["write_section"](md, "NEWER\n") == ""  # now with markers: only the block changes
    assert md.read_text() == old.replace("old table", f"{start}\nNEWER\n{end}\n\nold table")

    md.write_text("# Benchmarks\n\n## Other\n\ntext\n")  # no section yet: appended
    bench["write_section"](md, "NEW\n")
    assert md.read_text() == f"# Benchmarks\n\n## Other\n\ntext\n\n{section}\n\n{start}\nNEW\n{end}\n"


def test_latency_json_into_a_new_folder(tmp_path, capsys):
    """--json DIR/x.json creates DIR (as --md does), and writes atomically."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "new" / "logs" / "rows.json"
    assert run_main("latency.py", ["--smoke", "--skip-timm", "--skip-onnx", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())) == 3 and [p.name for p in out.parent.iterdir()] == ["rows.json"]


@pytest.mark.parametrize("flag", ["--json", "--md"])
def test_latency_unwritable_output_exits_2_before_timing(flag, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = [flag, str(tmp_path / "file" / "x.out"), "--skip-timm", "--skip-onnx", "--runs", "1", "--batches", "1"]
    refused("latency.py", argv, capsys, flag, "is a file, not a directory")


@pytest.mark.parametrize(("case", "words"), [
    ("cifar:resnet20:chanel:0.25", ("unknown SCHEME 'chanel'", "paper, channel, spatial")),
    ("cifar:resnet20:paper:2", ("KEEP '2' is not a number in (0, 1]",)),
    ("cifar:resnet20:paper:nan", ("KEEP 'nan'",)),
    ("cifar:resnet20:paper:0", ("KEEP '0'",)),
    ("cifar:resnet20:paper:-1", ("KEEP '-1'",)),
    ("cifar:resnet20:paper:half", ("KEEP 'half'",)),
    ("cifar:resnet32:paper:0.5", ("only cifar:resnet20",)),
    ("timm:resnet18:paper:0.5:0", ("SIZE '0'",)),
    ("run:TMP/missing_dir", ("run directory", "missing_dir", "does not exist")),
    ("run:TMP", ("is neither a dprp artifact",)),
    ("timm:not_a_model:channel:0.5", ("unknown timm model 'not_a_model'",)),
], ids=["scheme", "keep-2", "keep-nan", "keep-0", "keep-negative", "keep-word", "model", "size", "run-missing",
        "run-not-a-run", "timm-name"])
def test_latency_bad_case_exits_2_before_timing(case, words, tmp_path, capsys):
    """Every --case is checked before any is timed (a good first case is not measured either)."""
    case = case.replace("TMP", str(tmp_path))
    argv = ["--smoke", "--skip-onnx", "--case", "cifar:resnet20:channel:0.25", "--case", case]
    assert "eager" not in refused("latency.py", argv, capsys, f"--case {case!r}", *words).out


def test_latency_ranks_file_formats(tmp_path):
    """--ranks of latency.py reads what train_step.py reads (a run.json's "ranks", a history.jsonl)."""
    cifar_model = runpy.run_path(str(BENCHMARKS / "latency.py"), run_name="benchmark_latency")["cifar_model"]
    run_json, history = tmp_path / "run.json", tmp_path / "history.jsonl"
    run_json.write_text(json.dumps({"ranks": {"conv1": 3, "linear": 2}, "status": "done"}))
    history.write_text(json.dumps({"ranks": {"conv1": 9}}) + "\n" + json.dumps({"ranks": {"conv1": 3, "linear": 2}}))
    for path in (run_json, history):
        model, _, desc = cifar_model("paper", 0.5, str(path))
        layers = dict(svd_layers(model))
        assert layers["conv1"].rank == 3 and layers["linear"].rank == 2 and str(path) in desc
        assert all(m.rank == m.full_rank for n, m in layers.items() if n not in ("conv1", "linear"))


def test_latency_refuses_ignored_or_mismatched_ranks(tmp_path, capsys):
    from dprp_surgery.models import resnet20

    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"ranks": {"blocks.0.attn": 3}}))
    refused("latency.py", ["--smoke", "--skip-timm", "--ranks", str(ranks)], capsys, "--ranks", "none of its 1 layer "
            "names", "'blocks.0.attn'", "'conv1'")
    run_dir = dense_run_dir(tmp_path / "run", resnet20())
    ranks.write_text(json.dumps({"conv1": 3}))
    refused("latency.py", ["--smoke", "--run-dir", str(run_dir), "--ranks", str(ranks)], capsys,
            "--run-dir", "--ranks", "would be ignored")
    refused("latency.py", ["--smoke", "--skip-timm", "--run-dir", str(run_dir), "--keep", "0.25"], capsys,
            "--run-dir", "--keep 0.25 would change nothing")
    refused("latency.py", ["--smoke", "--case", "cifar:resnet20:paper:0.5", "--keep", "0.25"], capsys,
            "--case replaces --keep")
    refused("latency.py", ["--smoke", "--skip-timm", "--keep", "nan"], capsys, "--keep nan", "(0, 1]")


@pytest.mark.parametrize(("flags", "words"), [
    (["--schemes", "chanel"], ("--schemes", "invalid choice: 'chanel'")),
    (["--steps", "0"], ("--steps 0", "at least 1 step")),
    (["--ranks", "TMP/ranks.json"], ("--ranks", "none of its 1 layer names")),
], ids=["scheme", "steps", "ranks-of-another-model"])
def test_train_step_bad_input_exits_2(flags, words, tmp_path, capsys):
    (tmp_path / "ranks.json").write_text(json.dumps({"head.fc": 3}))
    refused("train_step.py", ["--smoke", *(f.replace("TMP", str(tmp_path)) for f in flags)], capsys, *words)


def test_train_step_reads_a_history(tmp_path, capsys):
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"epoch": 0, "ranks": {"conv1": 5}}) + "\n"
                       + json.dumps({"epoch": 1, "ranks": {"conv1": 2}}) + "\n")
    run_main("train_step.py", ["--smoke", "--schemes", "channel", "--ranks", str(history)])
    assert f"every layer cut to ranks of {history}" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "words"), [
    (["--baseline", "TMP/typo", "--model", "cifar:resnet20"], ("--baseline", "typo")),
    (["--baseline", "cifar:resnet20", "--model", "cifar:resnet20", "--model", "TMP/typo"], ("--model", "typo")),
    (["--baseline", "cifar:resnet20", "--model", "timm:not_a_model"], ("--model timm:not_a_model",
                                                                       "unknown timm model")),
    (["--baseline", "cifar:resnet20", "--model", "cifar:resnet20", "--data", "TMP/nodata"],
     ("--data", "nodata", "does not exist")),
], ids=["baseline", "second-model", "timm-name", "data"])
def test_paired_bad_input_exits_2_before_evaluating(flags, words, tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "d")
    if "--data" not in flags:
        flags = [*flags, "--data", str(data)]
    refused("paired.py", [f.replace("TMP", str(tmp_path)) for f in flags], capsys,
            *(w.replace("TMP", str(tmp_path)) for w in words))


def test_latency_times_a_run_directory_at_its_recorded_input_size(tmp_path):
    # every run directory was timed at 3x32x32, a timm run at 224px too
    from dprp_surgery.models import resnet20

    run_model = runpy.run_path(str(BENCHMARKS / "latency.py"), run_name="benchmark_latency")["run_model"]
    run_dir = dense_run_dir(tmp_path / "run", resnet20())
    info = json.loads((run_dir / "run.json").read_text())
    assert run_model(str(run_dir))[1] == (3, 32, 32)  # no size recorded: the CIFAR recipe's
    (run_dir / "run.json").write_text(json.dumps({**info, "input_size": [3, 40, 40]}))
    model, size, desc = run_model(str(run_dir))
    assert size == (3, 40, 40) and "at 40x40px" in desc and model(torch.zeros(1, *size)).shape == (1, 10)
