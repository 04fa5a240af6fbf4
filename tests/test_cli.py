"""The `dprp` command line: help texts, an end-to-end run on a tiny ImageFolder, and exit code 2 on bad input."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dprp_surgery.cli import app
from dprp_surgery.models import resnet20

runner = CliRunner()
COMMANDS = ("inspect", "compress", "export", "eval", "report", "demo")


def _flat(text: str) -> str:
    """Output with whitespace runs collapsed (rich may wrap long lines)."""
    return re.sub(r"\s+", " ", text)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def bad(*args: str, words: tuple[str, ...]):
    """Run a command that must fail with exit 2, a message naming `words` and no traceback."""
    result = invoke(*args)
    out = _flat(result.output)
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    for w in words:
        assert w in out, (w, out)
    return out


def make_image_folder(root: pathlib.Path, classes=("cat", "dog"), per_class: int = 8) -> pathlib.Path:
    """train/ and val/ ImageFolders of 32x32 PNGs, one colour per class plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, colour in zip(classes, ((200, 60, 60), (60, 60, 200), (60, 200, 60))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.clip(np.array(colour)[None, None] + rng.integers(-50, 50, (32, 32, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DPRP_CACHE", str(tmp_path_factory.getbasetemp() / "dprp-cache"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir) -> pathlib.Path:
    """One real compress run (1 epoch on 12 images), shared by the export/eval/report tests."""
    pytest.importorskip("dprp_surgery.trainer")
    out = tmp_path_factory.mktemp("runs") / "r20"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPRP_CACHE", str(tmp_path_factory.getbasetemp() / "dprp-cache"))
        result = invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epochs", "1",
                        "--batch-size", "8", "--limit-train", "12", "--lr", "0.01", "--epsilon", "0.3",
                        "--export-mode", "factorized", "--distill", "0.5", "--target-compression", "0.9",
                        "--structure-when-frozen", "false", "-q")
    assert result.exit_code == 0, result.output
    assert "before (dense)" in result.output and "after (exported)" in result.output
    # the additions to the paper reach the trainer: distillation from the loaded model, a target
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["distill"], config["target_compression"], config["structure_when_frozen"]) == (0.5, 0.9, False)
    record = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert record["kd"] >= 0 and record["compression_stopped"] is False
    return out


@pytest.mark.parametrize("weights", [False, True])
def test_seed_covers_the_random_init_and_a_new_head(tmp_path, data_dir, weights):
    # --seed ("every random number generator ... init") did not seed MODEL's random init nor the new 2-way head
    # that replaces a 10-way classifier: two runs with the same seed started from different weights
    model = "cifar:resnet20"
    if weights:
        from safetensors.torch import save_file

        save_file(resnet20(num_classes=10).state_dict(), str(tmp_path / "r20.safetensors"))
        model += f"@{tmp_path / 'r20.safetensors'}"
    losses = []
    for run in ("a", "b"):
        torch.manual_seed(len(losses))  # whatever state the process is in
        result = invoke("compress", model, "--data", data_dir, "--out", tmp_path / run, "--epochs", "1",
                        "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "--seed", "3", "-q")
        assert result.exit_code == 0, result.output
        losses.append(json.loads((tmp_path / run / "history.jsonl").read_text().splitlines()[0])["loss"])
    assert losses[0] == losses[1]


def test_a_dense_export_can_be_compressed_again_and_a_factorized_one_is_refused(tmp_path, run_dir, data_dir):
    # the dense export (plain Conv2d/Linear layers) was refused as "already factorized", like the run itself
    dense = tmp_path / "dense"
    assert invoke("export", run_dir, "--mode", "dense", "--out", dense).exit_code == 0
    result = invoke("compress", dense, "--data", data_dir, "--out", tmp_path / "again", "--epochs", "1",
                    "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "-q")
    assert result.exit_code == 0, result.output
    from dprp_surgery.export import layer_forms
    from dprp_surgery.io import load_model

    again, arch = load_model(tmp_path / "again" / "model")
    assert arch == "cifar:resnet20" and len(layer_forms(again)) == 20
    for model in (run_dir, run_dir / "model"):
        bad("compress", model, "--data", data_dir, "--out", tmp_path / "no",
            words=("is already factorized; continue its run with --resume, or compress its dense export "
                   f"(dprp export {model} --mode dense --out DIR)",))


def test_a_run_made_when_factorize_took_fewer_layers_still_loads_and_resumes(tmp_path, data_dir):
    # timm.layers.Linear joined the factorized types: runs written before kept it dense, and their checkpoints
    # no longer loaded ("missing keys ... .U") nor resumed ("its SVD layers differ"). Simulated here with a layer
    # excluded when the run was made, the exclusion then dropped from its records.
    from dprp_surgery.io import load_model

    run = tmp_path / "run"
    assert invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", run, "--epochs", "1", "--batch-size",
                  "8", "--limit-train", "8", "--limit-val", "4", "--exclude", "linear", "-q").exit_code == 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["config"]["exclude"] = []
    torch.save(ckpt, run / "checkpoint.pt")
    info = json.loads((run / "run.json").read_text())
    info["config"]["exclude"] = []
    (run / "run.json").write_text(json.dumps(info))
    model, _ = load_model(run)
    assert type(model.linear) is torch.nn.Linear
    assert invoke("export", run, "--mode", "dense", "--out", tmp_path / "dense").exit_code == 0
    result = invoke("compress", "--out", run, "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    assert len((run / "history.jsonl").read_text().splitlines()) == 2


def test_num_classes_that_replaces_the_head_is_known_as_a_new_head(tmp_path, data_dir):
    # --num-classes 3 with 10-class weights gave a random head the CLI took for the model's own: distillation
    # from it was not refused, its chance top-1 was recorded as "before", and eval scored it without a word
    from safetensors.torch import save_file

    save_file(resnet20(num_classes=10).state_dict(), str(tmp_path / "w.safetensors"))
    spec = f"cifar:resnet20@{tmp_path / 'w.safetensors'}"
    bad("compress", spec, "--data", data_dir, "--out", tmp_path / "r", "--num-classes", "2", "--distill", "0.5",
        words=("--distill 0.5 without --teacher would distil from MODEL itself", "10-way classifier"))
    bad("eval", spec, "--data", data_dir, "--num-classes", "2", "--no-latency",
        words=("--num-classes 2 replaces the 10-way classifier", "drop --num-classes"))
    result = invoke("compress", spec, "--data", data_dir, "--out", tmp_path / "r", "--num-classes", "2", "--epochs",
                    "1", "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "-q")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["new_head"] is True and info["results"]["before"]["top1"] is None


def test_compress_of_an_artifact_trains_at_the_size_it_records(tmp_path, data_dir):
    # a 48-px export was compressed again at timm's 176-px pretrained_cfg size (eval used the recorded 48)
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t", num_classes=2).state_dict(), str(tmp_path / "w.safetensors"))
    first = tmp_path / "first"
    assert invoke("compress", f"timm:resnet10t@{tmp_path / 'w.safetensors'}", "--data", data_dir, "--out", first,
                  "--image-size", "48", "--epochs", "1", "--batch-size", "8", "--limit-train", "8", "--limit-val",
                  "4", "-q").exit_code == 0
    assert invoke("export", first, "--mode", "dense", "--out", tmp_path / "dense").exit_code == 0
    result = invoke("compress", tmp_path / "dense", "--data", data_dir, "--out", tmp_path / "again", "--epochs", "1",
                    "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "again" / "run.json").read_text())["input_size"] == [3, 48, 48]


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("command", (None,) + COMMANDS)
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    if command:
        assert "Usage" in result.output
        assert "Example" in result.output
    else:
        for c in COMMANDS:
            assert c in result.output


def test_compress_flags_cover_every_config_field():
    from dataclasses import fields

    from dprp_surgery.config import DPRPConfig

    text = invoke("compress", "--help").output
    for f in fields(DPRPConfig):
        if f.name != "version":
            assert "--" + f.name.replace("_", "-") in text, f.name


def test_demo_help_documents_the_fallback():
    assert "SYNTHETIC" in _flat(invoke("demo", "--help").output)


# ----------------------------------------------------------------------------- inspect
def test_inspect_json():
    result = invoke("inspect", "cifar:resnet20", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["summary"]["rows"]
    assert len(rows) == 20 and all(r["status"] == "factorized" for r in rows)
    assert data["input_size"] == [3, 32, 32] and 0.5 < min(data["rank1_compression"].values()) < 1
    assert data["summarized"] == "factorized at full rank"
    table = invoke("inspect", "cifar:resnet20", "--scheme", "channel", "--input-size", "3,16,16")
    assert table.exit_code == 0 and "channel" in table.output and "R(1)" in table.output


def test_inspect_state_dict_with_arch(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(resnet20().state_dict(), path)
    bad("inspect", path, words=("--arch", str(path)))
    assert invoke("inspect", path, "--arch", "cifar:resnet20", "--json").exit_code == 0


# ----------------------------------------------------------------------------- end to end
def test_compress_writes_the_run(run_dir):
    info = json.loads((run_dir / "run.json").read_text())
    assert info["arch"] == "cifar:resnet20" and info["num_classes"] == 2 and info["status"] == "done"
    assert info["results"]["after"]["params"] > 0 and info["config"]["epochs"] == 1
    for name in ("checkpoint.pt", "history.jsonl", "model/manifest.json", "model/model.safetensors"):
        assert (run_dir / name).is_file(), name


def test_export_every_format(run_dir, tmp_path):
    import onnxruntime as ort

    from dprp_surgery.export import load
    from dprp_surgery.io import load_model

    svd_model, _ = load_model(run_dir)
    x = torch.randn(3, 3, 32, 32)
    ref = svd_model.eval()(x)
    art = tmp_path / "dense"
    result = invoke("export", run_dir, "--mode", "dense", "--format", "safetensors", "--out", art, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"] == {"dense": 20}
    fresh = resnet20(num_classes=2).eval()
    fresh.load_state_dict(load(art).state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ref, atol=1e-5, rtol=1e-4)

    onnx_path = tmp_path / "m.onnx"
    assert invoke("export", run_dir, "--mode", "factorized", "--format", "onnx", "--out", onnx_path).exit_code == 0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref.detach().numpy(), atol=1e-4, rtol=1e-4)

    pt2 = tmp_path / "m.pt2"
    result = invoke("export", run_dir / "model", "--mode", "auto", "--objective", "macs", "--format", "pt2",
                    "--out", pt2)
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(torch.export.load(str(pt2)).module()(x), ref, atol=1e-5, rtol=1e-4)


def test_eval_json(run_dir, data_dir):
    result = invoke("eval", run_dir, "--data", data_dir, "--json", "--latency-runs", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["images"] == 16 and 0 <= data["top1"] <= 100 and data["top5"] == 100.0
    assert data["params"] > 0 and data["macs"] > 0 and data["latency_ms_b1"] > 0 and data["latency_ms_b64"] > 0


def test_eval_needs_no_training_split(run_dir, data_dir, tmp_path):
    split = next(name for name in ("val", "test") if (pathlib.Path(data_dir) / name).is_dir())
    shutil.copytree(pathlib.Path(data_dir) / split, tmp_path / "only" / split)  # no train/
    result = invoke("eval", run_dir, "--data", tmp_path / "only", "--json", "--latency-runs", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 16


def test_eval_notes_data_whose_classes_differ_from_the_trained_ones(run_dir, data_dir, tmp_path):
    split = next(name for name in ("val", "test") if (pathlib.Path(data_dir) / name).is_dir())
    shutil.copytree(pathlib.Path(data_dir) / split, tmp_path / "same" / split)
    for model in (run_dir, run_dir / "model"):  # the run directory and its artifact
        result = invoke("eval", model, "--data", tmp_path / "same", "--latency-runs", "1")
        assert result.exit_code == 0 and "differ from those" not in _flat(result.output), result.output
    renamed = tmp_path / "renamed" / split
    shutil.copytree(pathlib.Path(data_dir) / split, renamed)
    first = sorted(p.name for p in renamed.iterdir())[0]
    (renamed / first).rename(renamed / f"zz_{first}")  # same images, another name: a position shifts
    for model in (run_dir, run_dir / "model"):
        result = invoke("eval", model, "--data", tmp_path / "renamed", "--latency-runs", "1")
        assert result.exit_code == 0, result.output
        assert "classes of" in _flat(result.output) and "differ from those" in _flat(result.output)
        assert "first at position 0" in _flat(result.output)


def test_report(run_dir):
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    for name in ("report.md", "ranks.png", "params_macs.png", "singular_values.png", "losses.png"):
        assert (run_dir / name).is_file(), name
    text = (run_dir / "report.md").read_text()
    assert "final val top-1" in text and "| layer1.0.conv1 |" in text


def test_report_lists_only_the_plots_it_wrote(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for stale in ("ranks.png", "photo.png"):  # a plot of an earlier report, any other picture
        (run / stale).write_bytes(b"")
    (run / "history.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0, "val_top1": 50.0}) + "\n")
    result = invoke("report", run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["plots"] == [str(run / "losses.png"), str(run / "accuracy.png")]
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert "2 plots: losses.png, accuracy.png" in _flat(result.output) and "ranks.png" not in result.output


def test_report_of_a_file_says_it_is_not_a_run_directory(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    bad("report", f, words=(str(f), "is a file, not a run directory", "--out"))


def test_a_stopped_run_records_its_full_ranks_and_reports_as_unfinished(data_dir, tmp_path, stop_in_epoch):
    """run.json has full_ranks from the start: a run stopped after epoch 0 reports its true initial ranks."""
    from dprp_surgery import DPRPConfig, factorize
    from dprp_surgery.surgery import svd_layers

    stop_in_epoch(1)  # the process is stopped during the second epoch
    out = tmp_path / "run"
    result = invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epochs", "2", "--batch-size",
                    "8", "--limit-train", "8", "--lambda-comp", "20", "--epsilon", "0.9", "-q")
    assert result.exit_code == 130, result.output
    info = json.loads((out / "run.json").read_text())
    full = {n: m.full_rank for n, m in svd_layers(factorize(resnet20(num_classes=2), DPRPConfig()))}
    assert info["status"] == "training" and info["full_ranks"] == full
    assert invoke("report", out).exit_code == 0
    text = (out / "report.md").read_text()
    assert "unfinished run" in text and "1 of 2 epochs recorded" in text
    cells = [[c.strip() for c in line.strip("| ").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert {c[0]: int(c[1]) for c in cells if c[0] in full} == full  # the table's initial column


def test_a_failed_start_leaves_no_run_behind(data_dir, tmp_path, monkeypatch):
    """A compress that fails before its first epoch leaves no run.json: the same --out simply works again."""
    from dprp_surgery.trainer import DPRPTrainer

    out = tmp_path / "run"
    args = ("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epochs", "1", "--batch-size", "8",
            "--limit-train", "8", "-q")
    bad(*args, "--exclude", "*", words=("exclude",))  # nothing to factorize
    assert not out.exists()

    def broken(self, epoch):
        raise RuntimeError("disk on fire")

    out.mkdir()
    run_epoch = DPRPTrainer._run_epoch
    monkeypatch.setattr(DPRPTrainer, "_run_epoch", broken)
    result = invoke(*args)
    assert result.exit_code == 1 and "disk on fire" in result.output, result.output
    assert list(out.iterdir()) == []  # no run.json saying "training" with no history
    monkeypatch.setattr(DPRPTrainer, "_run_epoch", run_epoch)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_resume_continues_the_run(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    bad("compress", "cifar:resnet20", "--data", "x", "--out", copy, words=("--resume", str(copy)))
    result = invoke("compress", "--out", copy, "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (copy / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]


def test_a_refused_resume_leaves_the_run_as_it_was(run_dir, tmp_path, monkeypatch):
    """Another MODEL or --scheme on --resume is refused by name; a refusal found later (here: the trainer's, for
    another lr schedule) restores run.json, so a plain --resume still works."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    bad("compress", "cifar:resnet32", "--out", copy, "--resume", "--epochs", "2", "-q",
        words=("MODEL 'cifar:resnet32' differs from the run's", "Leave MODEL out"))
    bad("compress", "--out", copy, "--resume", "--epochs", "2", "--scheme", "spatial", "-q",
        words=("--scheme cannot change on --resume", "scheme='paper'", "Drop --scheme"))
    bad("compress", "--out", copy, "--resume", "--epochs", "2", "--layer-types", "Linear", "-q",  # failed later
        words=("--layer-types cannot change on --resume", "Drop --layer-types"))
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    schedule = json.loads((copy / "run.json").read_text())["config"]["lr_schedule"]
    other = "plateau" if schedule != "plateau" else "cosine"
    bad("compress", "--out", copy, "--resume", "--epochs", "2", "--lr-schedule", other, "--lr", "0.5", "-q",
        words=(f"lr_schedule='{schedule}'", f"lr_schedule='{other}'"))
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before  # run.json restored
    result = invoke("compress", "--out", copy, "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output


def test_a_training_limit_below_the_class_count_is_noted(data_dir, tmp_path):
    result = invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "run", "--epochs", "1",
                    "--batch-size", "8", "--limit-train", "1", "--limit-val", "4")
    assert "--limit-train 1 leaves 1 of the 2 classes without a training image" in _flat(result.output), result.output


def test_compress_refuses_an_out_folder_that_is_not_a_run(data_dir, tmp_path):
    out = tmp_path / "somedir"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epochs", "1", "--batch-size", "8",
        "--limit-train", "8", "-q", words=("--out", "is not a dprp run directory", "notes.txt", "new or empty"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resuming_a_finished_run_says_it_only_exports(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    result = invoke("compress", "--out", copy, "--resume")
    assert result.exit_code == 0, result.output
    assert "already finished its 1 epochs: nothing to train" in _flat(result.output)
    assert "--epochs 2 or more" in _flat(result.output)


def test_an_interrupted_command_says_how_to_continue(data_dir, tmp_path, monkeypatch):
    from dprp_surgery.trainer import DPRPTrainer

    def stopped(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(DPRPTrainer, "_run_epoch", stopped)
    result = invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "run", "--epochs", "1",
                    "--batch-size", "8", "--limit-train", "8", "-q")
    assert result.exit_code == 130
    assert "interrupted" in result.output and "--resume" in _flat(result.output)


@pytest.mark.parametrize("command", ["compress", "demo"])
def test_fresh_run_refuses_an_out_that_holds_a_history(command, run_dir, data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    monkeypatch.setattr(commands, "_demo_archive", lambda: None)  # keep the demo small should it start
    monkeypatch.setattr(commands, "DEMO_TRAIN", 40)
    monkeypatch.setattr(commands, "DEMO_TEST", 20)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "checkpoint.pt").unlink()  # its history alone still makes it a run: a fresh one would append to it
    history = (copy / "history.jsonl").read_bytes()
    if command == "compress":
        bad("compress", "cifar:resnet20", "--data", data_dir, "--out", copy, "--epochs", "1", "--batch-size", "8",
            "--limit-train", "8", "-q", words=("--out", str(copy), "already holds a run", "history.jsonl", "--resume"))
    else:
        bad("demo", "--out", copy, "--epochs", "1", "-q", words=("--out", str(copy), "history.jsonl"))
    assert (copy / "history.jsonl").read_bytes() == history


def test_demo_synthetic_fallback(tmp_path, monkeypatch):
    pytest.importorskip("dprp_surgery.trainer")
    from dprp_surgery.cli import commands

    monkeypatch.setattr(commands, "_demo_archive", lambda: None)
    monkeypatch.setattr(commands, "DEMO_TRAIN", 40)
    monkeypatch.setattr(commands, "DEMO_TEST", 20)
    result = invoke("demo", "--out", tmp_path / "demo", "--epochs", "1", "-q")
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in _flat(result.output)
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "ranks.png").is_file()
    assert json.loads((tmp_path / "demo" / "run.json").read_text())["synthetic"] is True


# ----------------------------------------------------------------------------- bad input -> exit 2
def test_missing_files(tmp_path, data_dir):
    bad("inspect", tmp_path / "nope.pt", words=(str(tmp_path / "nope.pt"),))
    bad("inspect", f"cifar:resnet20@{tmp_path / 'w.th'}", words=(str(tmp_path / "w.th"), "does not exist"))
    bad("eval", "cifar:resnet20", "--data", tmp_path / "nodata", words=(str(tmp_path / "nodata"), "does not exist"))
    bad("report", tmp_path, words=("history.jsonl",))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "r", "--config", tmp_path / "c.yaml",
        words=("--config", "c.yaml", "does not exist"))


def test_corrupt_checkpoint_and_artifact(tmp_path, run_dir):
    ckpt = tmp_path / "broken.th"
    ckpt.write_bytes(b"\x00garbage" * 20)
    bad("inspect", f"cifar:resnet20@{ckpt}", words=(str(ckpt), "corrupt"))
    art = tmp_path / "art"
    shutil.copytree(run_dir / "model", art)
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\x01" * 64)
    bad("export", art, "--out", tmp_path / "x", words=("model.safetensors", "corrupt", "re-export"))
    (art / "manifest.json").write_text("{")
    bad("inspect", art, words=("manifest.json", "corrupt"))


def test_wrong_architecture_state_dict(tmp_path):
    path = tmp_path / "r20.pth"
    torch.save(resnet20().state_dict(), path)
    bad("inspect", f"timm:resnet18@{path}", words=(str(path), "timm:resnet18", "missing keys"))
    bad("inspect", f"cifar:resnet32@{path}", words=(str(path), "resnet32"))


def test_unknown_model_spec():
    bad("inspect", "foo:bar", words=("unknown model spec prefix 'foo'", "timm:NAME"))
    bad("inspect", "timm:not_a_model_xyz", words=("unknown timm model 'not_a_model_xyz'",))


def test_data_dir_without_classes(tmp_path):
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    bad("compress", "cifar:resnet20", "--data", tmp_path / "d", "--out", tmp_path / "r", "--epochs", "1",
        words=("no class subfolders", "train"))


def test_untrusted_pickle(tmp_path):
    class Touch:
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "model.pt"
    torch.save(Touch(), path)
    bad("inspect", path, words=(str(path), "--trust-pickle", "arbitrary code"))
    assert not (tmp_path / "pwned").exists()
    whole = tmp_path / "whole.pt"
    torch.save(resnet20(), whole)
    bad("inspect", whole, words=("--trust-pickle",))
    assert invoke("inspect", whole, "--trust-pickle", "--json").exit_code == 0


def test_invalid_config_values(tmp_path, data_dir):
    out = tmp_path / "r"
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epsilon", "2",
        words=("--epsilon", "(0, 1)"))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--scheme", "diagonal",
        words=("--scheme", "paper"))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--structure-when-frozen", "maybe",
        words=("--structure-when-frozen", "'maybe'", "true or false"))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--preset", "papr",
        words=("--preset", "paper"))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lambda_comp: -1\n")
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--config", cfg,
        words=("cfg.yaml", "lambda_comp"))
    cfg.write_text("epsilom: 0.1\n")
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--config", cfg,
        words=("epsilom", "epsilon"))
    bad("inspect", "cifar:resnet20", "--input-size", "3,x", words=("--input-size",))
    assert not out.exists()


def test_typer_usage_errors_exit_2():
    assert invoke("export", "somewhere").exit_code == 2  # --out missing
    assert invoke("export", "x", "--out", "y", "--format", "tflite").exit_code == 2


def test_compress_with_a_teacher(run_dir, data_dir, tmp_path, monkeypatch):
    from dprp_surgery.trainer import DPRPTrainer

    seen = {}
    init = DPRPTrainer.__init__

    def spy(self, *args, **kwargs):
        seen["teacher"] = kwargs.get("teacher")
        init(self, *args, **kwargs)

    monkeypatch.setattr(DPRPTrainer, "__init__", spy)
    teacher = run_dir / "model"  # the fixture's exported (factorized) model: fewer parameters than a dense R20
    out = tmp_path / "kd"
    result = invoke("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--epochs", "1",
                    "--batch-size", "8", "--limit-train", "12", "--distill", "0.5", "--teacher", teacher, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["teacher"] == str(teacher)
    shipped = json.loads((run_dir / "run.json").read_text())["results"]["after"]["params"]
    assert sum(p.numel() for p in seen["teacher"].parameters()) == shipped
    seen.clear()  # --resume takes the teacher from run.json, like the model and the data
    result = invoke("compress", "--out", out, "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    assert sum(p.numel() for p in seen["teacher"].parameters()) == shipped
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "x", "--teacher", teacher,
        words=("--teacher", "--distill 0.5"))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "y", "--distill", "0.5",
        "--teacher", tmp_path / "missing", words=("missing",))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "z", "--distill", "0.5",
        "--teacher", "cifar:resnet20", words=("--teacher", "10 outputs", "2 classes"))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "w", "--distill", "0.5",
        "--teacher", tmp_path / "r20.pt2", words=("--teacher", "r20.pt2", "dprp artifact"))
    onnx = tmp_path / "r20.onnx"
    onnx.write_bytes(b"\x08\x07onnx")  # the message said "not a MODEL here", without naming --teacher
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "v", "--distill", "0.5",
        "--teacher", onnx, words=("--teacher", "r20.onnx", "an ONNX file cannot be a teacher", "dprp artifact"))


@pytest.mark.parametrize("progress", [False, True])
def test_evaluate_counts_top1_and_top5(progress):
    from dprp_surgery.cli.commands import evaluate

    # 6 classes; logits descend with the class index, so the top 5 are classes 0..4
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]]).repeat(4, 1)
    labels = torch.tensor([0, 1, 4, 5])  # top-1 hit, top-5 hit, top-5 hit, miss
    loader = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    assert evaluate(torch.nn.Identity(), loader, progress=progress) == (25.0, 75.0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(torch.nn.Identity(), [], progress=progress)


# ----------------------------------------------------------------------------- export: input checks
@pytest.mark.parametrize("mode, noted", [("factorized", True), ("auto", True), ("dense", False)])
def test_export_of_an_uncompressed_model_says_so(tmp_path, mode, noted):
    result = invoke("export", "cifar:resnet20", "--mode", mode, "--out", tmp_path / "art", "--json")
    assert result.exit_code == 0, result.output
    assert ("has no factorized layers" in _flat(result.output)) == noted
    assert json.loads(result.stdout)["mode"] == mode  # the note goes to stderr: --json output stays parseable


def test_export_checks_input_size_and_out_before_writing(tmp_path):
    out = tmp_path / "o1"
    bad("export", "cifar:resnet20", "--out", out, "--input-size", "1,32,32",
        words=("--input-size '1,32,32'", "does not fit", "3 channels"))
    bad("export", "cifar:resnet20", "--out", tmp_path / "o.onnx", "--format", "onnx", "--input-size", "3,32",
        words=("--input-size '3,32'", "2 numbers", "C,H,W"))
    bad("inspect", "cifar:resnet20", "--input-size", "1,32,32", words=("--input-size '1,32,32'", "does not fit"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for fmt, target in (("onnx", afile / "x.onnx"), ("safetensors", afile / "sub")):
        bad("export", "cifar:resnet20", "--format", fmt, "--out", target,
            words=("--out", str(target), str(afile), "is a file"))
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "My PWA"}')
    (web / "index.html").write_text("<html>precious</html>")
    bad("export", "cifar:resnet20", "--out", web, words=("refusing to overwrite", str(web)))
    assert sorted(p.name for p in web.iterdir()) == ["index.html", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "webapp"] and afile.read_text() == "x"


def test_corrupt_manifest_layer_entry_exits_2(tmp_path, without_manifest_hash):
    from dprp_surgery.export import save

    art = save(resnet20(), tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "layers": {"layer1.0.conv1": "factorized"}}))
    bad("inspect", art, words=("manifest.json", "was changed after the model was saved", "re-export"))
    shutil.rmtree(art)
    art = without_manifest_hash(save(resnet20(), tmp_path / "art"))  # an artifact of before the manifest hash
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "layers": {"layer1.0.conv1": "factorized"}}))
    bad("inspect", art, words=("manifest.json", "'layer1.0.conv1'", "invalid entry"))


def test_inspect_of_a_factorized_export_counts_its_original_layers(tmp_path):
    from dprp_surgery import DPRPConfig, factorize, svd_layers
    from dprp_surgery.export import export, save

    torch.manual_seed(0)
    fact = factorize(resnet20(), DPRPConfig(min_compressible=None)).eval()
    for _, layer in svd_layers(fact):
        layer.truncate_(max(1, layer.rank // 4))
    reports = {}
    for form, model in (("svd", fact), ("factorized", export(fact, "factorized"))):
        result = invoke("inspect", save(model, tmp_path / form), "--json")
        assert result.exit_code == 0, result.output
        reports[form] = json.loads(result.stdout)
    svd, exported = reports["svd"], reports["factorized"]
    assert len(exported["summary"]["rows"]) == 20
    assert {r["status"] for r in exported["summary"]["rows"]} == {"factorized"}
    assert exported["summary"]["dense_params"] == svd["summary"]["dense_params"]
    assert exported["summary"]["params_removed"] == pytest.approx(svd["summary"]["params_removed"], abs=0.002)
    assert 0.75 < exported["summary"]["params_removed"] < 0.8
    assert exported["rank1_compression"] == pytest.approx(svd["rank1_compression"])
    assert exported["summarized"] == svd["summarized"] == "as loaded"


def test_inspect_of_a_run_dir_says_it_summarises_the_checkpoint(run_dir):
    result = invoke("inspect", run_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summarized"].startswith("training checkpoint (SVD form; the exported model is")
    table = invoke("inspect", run_dir)
    assert table.exit_code == 0 and "training checkpoint" in _flat(table.output)


# ----------------------------------------------------------------------------- resume, --out, --device, --distill
@pytest.fixture(scope="module")
def rel_run(tmp_path_factory, data_dir) -> pathlib.Path:
    """A 2-epoch run started from its parent folder with relative paths, --export-mode factorized, --objective macs."""
    pytest.importorskip("dprp_surgery.trainer")
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(data_dir, work / "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPRP_CACHE", str(tmp_path_factory.getbasetemp() / "dprp-cache"))
        mp.chdir(work)
        result = invoke("compress", "cifar:resnet20", "--data", "tiny", "--out", "runs/r", "--epochs", "2",
                        "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "--export-mode", "factorized",
                        "--objective", "macs", "-q")
    assert result.exit_code == 0, result.output
    return work / "runs" / "r"


def test_resume_keeps_export_mode_objective_and_works_from_another_directory(rel_run, tmp_path, monkeypatch):
    info = json.loads((rel_run / "run.json").read_text())
    assert pathlib.Path(info["data"]).resolve() == (rel_run.parent.parent / "tiny").resolve()
    assert pathlib.Path(info["data"]).is_absolute() and info["model"] == "cifar:resnet20"
    copy = tmp_path / "run"
    shutil.copytree(rel_run, copy)
    monkeypatch.chdir(tmp_path)  # run.json's data path must not depend on the directory the run started in
    result = invoke("compress", "--out", copy, "--resume", "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    info = json.loads((copy / "run.json").read_text())
    assert (info["export_mode"], info["objective"], info["config"]["epochs"]) == ("factorized", "macs", 3)
    result = invoke("compress", "--out", copy, "--resume", "--epochs", "3", "--export-mode", "dense", "-q")
    assert result.exit_code == 0, result.output  # a flag given now still wins
    info = json.loads((copy / "run.json").read_text())
    assert (info["export_mode"], info["objective"]) == ("dense", "macs")
    assert "with --resume the run's" in _flat(invoke("compress", "--help").output)


def test_resume_keeps_num_classes(data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    out = tmp_path / "run"
    result = invoke("compress", "cifar:resnet20", "--num-classes", "2", "--data", data_dir, "--out", out,
                    "--epochs", "1", "--batch-size", "8", "--limit-train", "8", "--limit-val", "4", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["num_classes_flag"] == 2
    seen = []
    load = commands._load
    monkeypatch.setattr(commands, "_load", lambda spec, **kw: seen.append(kw["num_classes"]) or load(spec, **kw))
    result = invoke("compress", "--out", out, "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 0, result.output
    assert seen == [2]


def test_absolute_specs_keep_their_prefix(tmp_path, monkeypatch):
    from dprp_surgery.cli.commands import _absolute_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.th").write_bytes(b"x")
    (tmp_path / "tiny").mkdir()
    here = pathlib.Path.cwd()
    assert _absolute_spec("cifar:resnet20@w.th") == f"cifar:resnet20@{here / 'w.th'}"
    assert _absolute_spec("timm:resnet18@./w.th") == f"timm:resnet18@{here / 'w.th'}"
    assert _absolute_spec("cifar10:data") == f"cifar10:{here / 'data'}"
    assert _absolute_spec("tiny") == str(here / "tiny")
    assert _absolute_spec("timm:resnet18") == "timm:resnet18" and _absolute_spec(None) is None


def test_a_failing_value_from_run_json_names_it(rel_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(rel_run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["data"] = "gone-data"
    (copy / "run.json").write_text(json.dumps(info))
    bad("compress", "--out", copy, "--resume", "--epochs", "2", "-q",
        words=("gone-data", str(copy / "run.json"), "pass --data to override it"))


def test_resume_with_fewer_epochs_than_finished(rel_run, tmp_path):
    from dprp_surgery.config import DPRPConfig
    from dprp_surgery.surgery import factorize
    from dprp_surgery.trainer import DPRPTrainer

    copy = tmp_path / "run"
    shutil.copytree(rel_run, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    bad("compress", "--out", copy, "--resume", "--epochs", "1", "-q",
        words=("--epochs 1", "2 epochs", "--epochs 2 or more"))
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    # the library refuses too
    config = DPRPConfig(epochs=1, device="cpu")
    batch = [(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="finished 2 epochs.*epochs=1"):
        DPRPTrainer(factorize(resnet20(num_classes=2), config), config, batch, resume=copy / "checkpoint.pt",
                    progress=False)


def test_device_cuda_without_cuda_fails_before_the_data(data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(commands, "open_data", lambda *a, **k: pytest.fail("the data was loaded"))
    out = tmp_path / "r"
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", out, "--device", "cuda", "--epochs", "1",
        words=("--device 'cuda'", "torch.cuda.is_available() is false", "--device cpu"))
    assert not out.exists()


@pytest.mark.parametrize("command", ["compress", "demo"])
def test_out_that_is_a_file(command, data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    monkeypatch.setattr(commands, "open_data", lambda *a, **k: pytest.fail("the data was loaded"))
    monkeypatch.setattr(commands, "_demo_archive", lambda: pytest.fail("the demo data was looked up"))
    f = tmp_path / "f"
    f.write_text("keep me")
    args = ("compress", "cifar:resnet20", "--data", data_dir) if command == "compress" else ("demo",)
    bad(*args, "--out", f, "--epochs", "1", "-q", words=("--out", str(f), "not a directory"))
    bad(*args, "--out", f / "x", "--epochs", "1", "-q", words=("--out", str(f / "x"), "is a file"))
    assert f.read_text() == "keep me"


def test_distill_without_teacher_refuses_a_new_head(data_dir, tmp_path):
    weights = tmp_path / "w.th"
    torch.save(resnet20().state_dict(), weights)  # 10 classes; the data has 2
    out = tmp_path / "r"
    bad("compress", f"cifar:resnet20@{weights}", "--data", data_dir, "--out", out, "--epochs", "1",
        "--distill", "0.5", "-q", words=("--distill 0.5", "10-way", "--teacher MODEL", "--distill 0"))
    assert not out.exists()


def test_report_of_a_one_epoch_run_has_integer_epoch_ticks(run_dir, monkeypatch):
    from dprp_surgery import report

    figures = []
    figure = report._figure
    monkeypatch.setattr(report, "_figure", lambda w, h: figures.append(figure(w, h)) or figures[-1])
    report.make_report(run_dir)
    axes = [ax for fig in figures for ax in fig.axes if ax.get_xlabel() == "epoch"]
    assert len(axes) >= 3
    for ax in axes:
        lo, hi = sorted(ax.get_xlim())
        shown = [float(t) for t in ax.get_xticks() if lo <= t <= hi]
        assert shown == [0.0], (ax.get_title(), shown)
    text = (run_dir / "report.md").read_text()
    # the run's model got a new 2-way classifier: no "before" top-1 (it would be chance), and the report says why
    assert "(exported model); not measured before training, where the model had a new, untrained classifier" in text
    assert "(dense model, as given)" not in text and "top-1 of the exported model" not in text
    assert json.loads((run_dir / "run.json").read_text())["results"]["before"]["top1"] is None


def test_demo_json_lists_the_report(tmp_path, monkeypatch):
    pytest.importorskip("dprp_surgery.trainer")
    from dprp_surgery.cli import commands

    monkeypatch.setattr(commands, "_demo_archive", lambda: None)
    monkeypatch.setattr(commands, "DEMO_TRAIN", 40)
    monkeypatch.setattr(commands, "DEMO_TEST", 20)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "photo.png").write_bytes(b"")  # a PNG the demo did not write is not one of its plots
    result = invoke("demo", "--out", out, "--epochs", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["report"] == str(out / "report.md") and data["synthetic"] is True
    assert str(out / "ranks.png") in data["plots"] and data["run_dir"] == str(out)
    assert str(out / "photo.png") not in data["plots"] and all(pathlib.Path(p).stat().st_size for p in data["plots"])


@pytest.mark.parametrize("command", ["inspect", "compress", "export"])
def test_an_onnx_file_is_refused_where_it_cannot_be_factorized(command, tmp_path, data_dir):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07onnx")
    args = {"inspect": ("inspect", onnx), "compress": ("compress", onnx, "--data", data_dir, "--out", tmp_path / "r"),
            "export": ("export", onnx, "--out", tmp_path / "e")}[command]
    bad(*args, words=("ONNX file", "not a MODEL", "cifar:NAME[@WEIGHTS]", "run directory",
                      "`dprp eval` runs ONNX files in onnxruntime"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


def test_eval_runs_an_exported_onnx_file_in_onnxruntime(run_dir, data_dir, tmp_path):
    # `dprp eval` refused ONNX files, the form most models ship in: the accuracy of the shipped file was unmeasurable
    onnx = tmp_path / "m.onnx"
    # the run's exported model as it is (eval of RUN_DIR evaluates RUN_DIR/model)
    assert invoke("export", run_dir / "model", "--mode", "factorized", "--format", "onnx", "--out", onnx).exit_code == 0
    results = []
    for model in (run_dir, onnx):
        result = invoke("eval", model, "--data", data_dir, "--no-latency", "--json")
        assert result.exit_code == 0, result.output
        results.append(json.loads(result.stdout))
    torch_side, ort_side = results
    for key in ("top1", "top5", "params", "macs", "images"):
        assert ort_side[key] == torch_side[key], key
    assert torch_side["macs"] > 0 and torch_side["params_source"] == "counted"
    assert (ort_side["runtime"], ort_side["params_source"], torch_side["runtime"]) == (
        "onnxruntime", "recorded at export", "pytorch")
    result = invoke("eval", onnx, "--data", data_dir, "--latency-runs", "1")
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    assert "parameters (recorded at export)" in out and re.search(r"runtime\W+onnxruntime", out), out
    assert re.search(r"latency batch 64 \(ms\)\W+\d", out), out


def test_an_onnx_file_from_elsewhere_shows_what_it_stores(tmp_path, data_dir):
    from dprp_surgery.accounting import count_params
    from dprp_surgery.export import to_onnx

    model = resnet20(num_classes=2).eval()
    onnx = to_onnx(model, tmp_path / "plain.onnx", torch.zeros(1, 3, 32, 32), dynamic_batch=False)  # no recipe
    result = invoke("eval", onnx, "--data", data_dir, "--no-latency", "--batch-size", "5", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["params_source"] == "onnx initializers" and data["macs"] is None
    import onnx as onnx_lib

    stored = sum(int(np.prod(t.dims)) for t in onnx_lib.load(str(onnx)).graph.initializer)
    assert data["params"] == stored and 0.9 * count_params(model) < stored  # batch norms folded into the convs
    result = invoke("eval", onnx, "--data", data_dir, "--no-latency")
    out = _flat(result.output)
    assert result.exit_code == 0 and "stored values (ONNX initializers)" in out
    assert "records no normalisation (`dprp export --format onnx` records it)" in out


class _Pooled(torch.nn.Module):
    """A (N, 3, 1, 1) output: its labels broadcast to top-1 500% when taken for (N, classes)."""

    def __init__(self):
        super().__init__()
        self.c, self.p = torch.nn.Conv2d(3, 3, 1), torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.c(self.p(x) * 100)


class _TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return x.mean((2, 3)) + y.mean((2, 3))


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = resnet20(num_classes=2), torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_eval_scores_only_class_score_outputs(tmp_path, data_dir):
    # a (N, 3, 1, 1) output scored top-1 500%; a 1-D one, a dense map or several outputs crashed with exit 1
    from dprp_surgery.export import to_onnx, to_pt2

    x = torch.zeros(1, 3, 32, 32)
    pooled = to_onnx(_Pooled(), tmp_path / "pooled.onnx", x)
    bad("eval", pooled, "--data", data_dir, "--no-latency",
        words=("the model's output has shape (16, 3, 1, 1) for a batch of 16 images, not (batch, classes)",))
    program = tmp_path / "pooled.pt2"
    to_pt2(_Pooled(), program, x)
    bad("eval", program, "--data", data_dir, "--no-latency", words=("not (batch, classes)",))
    fixed = tmp_path / "fixed.pt2"  # exported for batch 1: the message said to change the image size
    torch.export.save(torch.export.export(resnet20(), (x,)), str(fixed))
    bad("eval", fixed, "--data", data_dir, "--no-latency",
        words=("was exported for a fixed batch size", "re-export it with a dynamic batch"))
    two = to_onnx(_TwoOutputs().eval(), tmp_path / "two.onnx", x)  # the first output holds the class scores
    result = invoke("eval", two, "--data", data_dir, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(result.stdout)["top1"] <= 100
    inputs = to_onnx(_TwoInputs(), tmp_path / "inputs.onnx", (x, x))
    bad("eval", inputs, "--data", data_dir, words=("takes 2 inputs (input, input_1)", "one batch of images"))
    nhwc = to_onnx(_ChannelsLast(), tmp_path / "nhwc.onnx", torch.zeros(1, 32, 32, 3))
    bad("eval", nhwc, "--data", data_dir, words=("takes input of shape (N, 32, 32, 3)", "channels last",
                                                  "dprp eval feeds NCHW image batches"))


class _ChannelsLast(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2).mean((2, 3))


def test_eval_of_onnx_names_the_size_it_takes_and_checks_the_class_order(run_dir, data_dir, tmp_path):
    onnx = tmp_path / "r.onnx"
    assert invoke("export", run_dir, "--format", "onnx", "--out", onnx).exit_code == 0
    bad("eval", onnx, "--data", data_dir, "--no-latency", "--image-size", "40",
        words=("takes 32x32 images (input (N, 3, 32, 32)), but the images were decoded at 40x40",
               "drop --image-size 40 or pass --image-size 32"))
    renamed = tmp_path / "renamed"
    shutil.copytree(data_dir, renamed)
    for split in ("train", "val"):
        (renamed / split / "cat").rename(renamed / split / "zebra")
    for model in (run_dir, onnx):  # a run checks the data's classes against those it was trained on; so does its ONNX
        result = invoke("eval", model, "--data", renamed, "--no-latency")
        assert result.exit_code == 0, result.output
        assert "differ from those" in _flat(result.output) and "'dog' against 'cat'" in _flat(result.output)


def test_bad_onnx_input_to_eval_exits_2(tmp_path, data_dir):
    corrupt = tmp_path / "m.onnx"
    corrupt.write_bytes(b"\x08\x07onnx")
    bad("eval", corrupt, "--data", data_dir, words=(f"cannot read {str(corrupt)!r} as an ONNX model", "Re-export it"))
    onnx = tmp_path / "ok.onnx"
    assert invoke("export", "cifar:resnet20", "--format", "onnx", "--out", onnx).exit_code == 0
    bad("eval", onnx, "--data", data_dir, "--no-latency", "--image-size", "64",
        words=(f"{str(onnx)!r} takes 32x32 images (input (N, 3, 32, 32)), but the images were decoded at 64x64",
               "drop --image-size 64 or pass --image-size 32"))
    bad("eval", onnx, "--data", data_dir, "--num-classes", "3",
        words=("--num-classes does not apply to the ONNX file", "drop --num-classes"))


@pytest.mark.parametrize("command", ["compress", "eval"])
@pytest.mark.parametrize("flag", [[], ["--download"]])
def test_download_flag_reaches_torchvision_cifar(command, flag, tmp_path, monkeypatch):
    import dprp_surgery.data as data_module

    seen = []

    def fake_cifar(kind, root, download, image_size):
        seen.append((kind, download))
        raise ValueError(f"{kind} not found in {root!r} (test stub)")

    monkeypatch.setattr(data_module, "_open_torchvision_cifar", fake_cifar)
    args = [command, "cifar:resnet20", "--data", f"cifar10:{tmp_path / 'c10'}", *flag]
    args += ["--out", tmp_path / "run"] if command == "compress" else ["--no-latency"]
    bad(*args, words=("cifar10 not found",))
    assert seen == [("cifar10", bool(flag))]
    assert "--download" in _flat(invoke(command, "--help").output)


def test_report_keeps_the_trainers_percentages_below_one(tmp_path):
    from dprp_surgery.report import make_report

    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": e, "loss": 4.8 - e, "train_top1": 0.5 + e, "val_top1": 0.83, "params": 100, "macs": 1000}
               for e in range(2)]  # 120 classes early in training: top-1 under 1%
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = make_report(run).path.read_text()
    assert "final val top-1: 0.83%" in text and "final train top-1: 1.50%" in text


def test_eval_uses_the_input_size_an_artifact_was_compressed_at(tmp_path, data_dir):
    from dprp_surgery import DPRPConfig, factorize, save, summarize

    model = factorize(resnet20(), DPRPConfig(min_compressible=None))
    art = save(model, tmp_path / "art", input_size=[3, 16, 16])
    result = invoke("eval", art, "--data", data_dir, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["macs"] == summarize(model, torch.zeros(1, 3, 16, 16)).macs


def test_image_size_a_fixed_size_model_cannot_take_exits_2_before_the_data(tmp_path, monkeypatch):
    import timm

    import dprp_surgery.cli.commands as commands

    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=2).state_dict(), weights)
    monkeypatch.setattr(commands, "open_data", lambda *a, **k: pytest.fail("data decoded before the check"))
    bad("compress", f"timm:vit_tiny_patch16_224@{weights}", "--data", tmp_path, "--out", tmp_path / "run",
        "--image-size", "64", words=("--image-size '64'", "does not fit", "(its own is 224)", "leave --image-size out"))
    assert not (tmp_path / "run").exists()


def test_an_input_size_a_fixed_size_model_cannot_take_suggests_the_models_own(tmp_path):
    # the fix suggested 3,32,32, which fails again for a 224px ViT
    bad("inspect", "timm:vit_tiny_patch16_224", "--input-size", "3,64,64",
        words=("--input-size '3,64,64'", "does not fit", "e.g. 3,224,224, this model's own size"))
    bad("inspect", "cifar:resnet20", "--input-size", "1,32,32", words=("e.g. 3,32,32, this model's own size",))


# ----------------------------------------------------------------------------- outputs that cannot be written
def _refuse_writes_in(monkeypatch, folder: pathlib.Path) -> None:
    """Make creating a file in `folder` fail with EACCES (as a read-only mount does, also for root)."""
    import tempfile

    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and pathlib.Path(dir) == folder:
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize("args", [
    ("compress", "cifar:resnet20", "--data", "DATA", "--epochs", "1", "-q"),
    ("demo", "--epochs", "1", "-q"),
    ("export", "cifar:resnet20", "--format", "safetensors"),
    ("export", "cifar:resnet20", "--format", "onnx"),
    ("export", "cifar:resnet20", "--format", "pt2"),
], ids=["compress", "demo", "safetensors", "onnx", "pt2"])
def test_an_out_in_a_read_only_directory_exits_2_before_any_work(args, data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    monkeypatch.setattr(commands, "open_data", lambda *a, **k: pytest.fail("the data was loaded"))
    monkeypatch.setattr(commands, "_demo_archive", lambda: pytest.fail("the demo data was looked up"))
    monkeypatch.setattr(commands, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    locked = tmp_path / "locked"
    locked.mkdir()
    _refuse_writes_in(monkeypatch, locked)
    suffix = {"onnx": ".onnx", "pt2": ".pt2"}.get(args[-1], "")
    out = locked / "new" / f"x{suffix}"
    args = tuple(str(data_dir) if a == "DATA" else a for a in args)
    bad(*args, "--out", out, words=("--out", str(out), "cannot be written", str(locked), "Permission denied",
                                    "choose another --out path"))
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(not pathlib.Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["export", "demo"])
def test_an_out_under_proc_names_out_not_a_temp_file(command):
    args = ("export", "cifar:resnet20", "--format", "onnx", "--out", "/proc/dprp-x.onnx") if command == "export" \
        else ("demo", "--out", "/proc/dprp-demo", "-q")
    out = bad(*args, words=("--out", "/proc/dprp-", "cannot be written", "'/proc'"))
    assert ".tmp-" not in out and ".dprp-write-test" not in out


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_replaces_only_an_earlier_export_of_the_same_format(fmt, tmp_path):
    target = tmp_path / f"model.{fmt}"
    target.write_text("my notes, not a model")
    bad("export", "cifar:resnet20", "--format", fmt, "--out", target,
        words=("refusing to overwrite", str(target), "is not", "choose another --out path"))
    assert target.read_text() == "my notes, not a model"
    target.unlink()
    assert invoke("export", "cifar:resnet20", "--format", fmt, "--out", target, "--json").exit_code == 0
    first = target.read_bytes()
    result = invoke("export", "cifar:resnet20", "--mode", "factorized", "--format", fmt, "--out", target, "--json")
    assert result.exit_code == 0, result.output  # an earlier export of the same format is replaced
    assert target.read_bytes() != first
    other = "pt2" if fmt == "onnx" else "onnx"
    wrong = tmp_path / f"model.{other}"
    assert invoke("export", "cifar:resnet20", "--format", other, "--out", wrong).exit_code == 0
    renamed = wrong.rename(tmp_path / f"other.{fmt}")  # an export of the other format is not replaced either
    bad("export", "cifar:resnet20", "--format", fmt, "--out", renamed, words=("refusing to overwrite", str(renamed)))


@pytest.mark.parametrize(("fmt", "name", "words"), [
    ("onnx", "m.safetensors", ("ends in .safetensors", "--format onnx", "--out {dir}/m.onnx")),
    ("onnx", "m.pt2", ("ends in .pt2", "--format onnx", "--out {dir}/m.onnx")),
    ("pt2", "m", ("has no suffix", "--format pt2", "--out {dir}/m.pt2")),
    ("safetensors", "m.onnx", ("ends in .onnx", "--format safetensors", "pass --format onnx")),
])
def test_an_out_suffix_of_another_format_exits_2(fmt, name, words, tmp_path):
    # the suggested --out keeps the directory (copying it writes where the user meant)
    words = tuple(w.format(dir=tmp_path) for w in words)
    bad("export", "cifar:resnet20", "--format", fmt, "--out", tmp_path / name, words=("--out", name, *words))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- config files
@pytest.mark.parametrize(("name", "content", "words"), [
    ("c.json", b'{"epsilon": 0.1,', ("cannot be parsed", "JSONDecodeError", "line 1")),
    ("c.yaml", b"epsilon: [0.1\n", ("cannot be parsed",)),
    ("c.json", b'{"epsilon": "\xff"}', ("is not UTF-8 text", "byte 13")),
    ("c.yaml", b"# nothing set\n", ("must hold a mapping of DPRPConfig fields", "holds nothing (it is empty")),
    ("c.yaml", b"- lr: 0.1\n", ("must hold a mapping", "holds a list")),
    ("c.yaml", b"0\n", ("must hold a mapping", "holds an int")),
    ("c.yaml", b"lr: 0.1\nlr: 0.5\n", ("cannot be parsed", "'lr' is set twice (0.1, then 0.5)")),
])
def test_a_config_file_that_cannot_be_read_is_named(name, content, words, data_dir, tmp_path):
    cfg = tmp_path / name
    cfg.write_bytes(content)
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "r", "--config", cfg,
        words=("--config file", str(cfg), *words))
    assert not (tmp_path / "r").exists()


def test_a_yaml_config_reads_exponent_floats_as_the_api_does(data_dir, tmp_path, monkeypatch):
    # `lr: 5e-3` (a string to YAML 1.1) loaded through DPRPConfig.load but was refused by --config
    import dprp_surgery.cli.commands as commands

    cfg = tmp_path / "c.YAML"  # an upper-case suffix was refused too
    cfg.write_text("lr: 5e-3\nweight_decay: 1e-4\nepochs: 1\n")
    seen = {}
    real = commands.build_config

    def spy(*args, **kwargs):
        seen["config"] = real(*args, **kwargs)
        return seen["config"]

    monkeypatch.setattr(commands, "build_config", spy)
    monkeypatch.setattr(commands, "open_data", lambda *a, **k: (_ for _ in ()).throw(ValueError("stop here")))
    bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "r", "--config", cfg,
        words=("stop here",))
    assert (seen["config"].lr, seen["config"].weight_decay) == (0.005, 1e-4)


def test_a_config_directory_is_not_called_missing(data_dir, tmp_path):
    folder = tmp_path / "cfg.yaml"
    folder.mkdir()
    out = bad("compress", "cifar:resnet20", "--data", data_dir, "--out", tmp_path / "r", "--config", folder,
              words=("--config", str(folder), "is a directory"))
    assert "does not exist" not in out


# ----------------------------------------------------------------------------- resume and class counts
@pytest.mark.parametrize("kind", ["pickle", "garbage"])
def test_resume_from_a_checkpoint_torch_refuses(kind, run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)

    class Touch:
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / "pwned",))

    if kind == "pickle":
        torch.save({"format": "dprp", "extra": Touch()}, copy / "checkpoint.pt")
        words = ("pickled Python objects", "would run code")
    else:
        (copy / "checkpoint.pt").write_bytes(b"\x00garbage" * 20)
        words = ("corrupt or truncated",)
    out = bad("compress", "--out", copy, "--resume", "--epochs", "2", "-q",
              words=(str(copy / "checkpoint.pt"), *words, "without --resume"))
    assert "weights_only" not in out and "add_safe_globals" not in out
    assert not (tmp_path / "pwned").exists()


def test_one_class_data_exits_2(tmp_path):
    data = make_image_folder(tmp_path / "one", classes=("cat",), per_class=2)
    bad("compress", "cifar:resnet20", "--data", data, "--out", tmp_path / "r", "--epochs", "1", "-q",
        words=("--data", "only one class", "'cat'", "at least two class subfolders"))
    assert not (tmp_path / "r").exists()


def test_eval_notes_a_model_with_more_outputs_than_classes(data_dir):
    result = invoke("eval", "cifar:resnet20", "--data", data_dir, "--no-latency", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 16  # the note goes to stderr
    note = _flat(result.stderr)
    assert "10 outputs" in note and "2 classes" in note and "cat, dog" in note and "other 8 outputs" in note


def test_report_of_a_read_only_run_says_where_it_writes(run_dir, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = sorted(p.name for p in copy.iterdir())
    _refuse_writes_in(monkeypatch, copy)
    bad("report", copy, words=("RUN_DIR", str(copy), "cannot be written", "Permission denied", "report.md",
                               "copy the run directory somewhere writable"))
    assert sorted(p.name for p in copy.iterdir()) == before


@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_a_pt2_model_is_refused_where_it_cannot_be_factorized(command, data_dir, tmp_path, monkeypatch):
    from dprp_surgery.cli import commands

    program = tmp_path / "m.pt2"
    assert invoke("export", "cifar:resnet20", "--format", "pt2", "--out", program).exit_code == 0
    args = ("compress", program, "--data", data_dir, "--out", tmp_path / "r", "--arch", "cifar:resnet20", "-q") \
        if command == "compress" else ("inspect", program, "--input-size", "3,32,32")
    with monkeypatch.context() as patched:
        patched.setattr(commands, "open_data", lambda *a, **k: pytest.fail("the data was loaded"))
        bad(*args, words=(str(program), "torch.export program (.pt2)", f"`dprp {command}` cannot factorize it",
                          "dprp eval"))
    assert not (tmp_path / "r").exists()
    result = invoke("eval", program, "--data", data_dir, "--no-latency", "--json")
    assert result.exit_code == 0, result.output  # where a .pt2 works


def test_a_pt2_is_evaluated_at_its_size_and_normalisation(tmp_path, data_dir):
    # eval of a .pt2 fed the images at their own size (a raw "Guard failed" exit 1 for a 176-px timm model) and
    # normalised them with ImageNet's mean/std whatever the model's recipe: the export now records both
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "r10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=2).state_dict(), str(weights))
    spec, program, artifact = f"timm:resnet10t@{weights}", tmp_path / "m.pt2", tmp_path / "art"
    assert invoke("export", spec, "--format", "pt2", "--out", program).exit_code == 0
    assert invoke("export", spec, "--out", artifact).exit_code == 0
    scores = []
    for model in (program, artifact):
        result = invoke("eval", model, "--data", data_dir, "--no-latency", "--json")
        assert result.exit_code == 0, result.output
        scores.append({k: json.loads(result.stdout)[k] for k in ("top1", "top5", "macs")})
    assert scores[0] == scores[1]
    bad("eval", program, "--data", data_dir, "--no-latency", "--image-size", "64",
        words=(f"{str(program)!r} (a torch.export program) does not take (3, 64, 64) images",
               "pass --image-size N with the size it was exported at"))


def test_a_pt2_records_what_it_was_exported_from(tmp_path):
    from dprp_surgery.export import to_pt2
    from dprp_surgery.io import data_recipe, load_model

    path = to_pt2(resnet20(num_classes=2), tmp_path / "m.pt2", torch.zeros(1, 3, 40, 40),
                  metadata={"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})
    model, arch = load_model(path)
    recipe = data_recipe(arch, model)
    assert (recipe.mean, recipe.std, recipe.image_size) == ((0.5,) * 3, (0.25,) * 3, 40)
    plain = tmp_path / "plain.pt2"  # written elsewhere: no metadata, the defaults as before
    torch.export.save(torch.export.export(resnet20(), (torch.zeros(2, 3, 32, 32),)), str(plain))
    model, arch = load_model(plain)
    assert data_recipe(arch, model).source == "ImageNet defaults" and not hasattr(model, "_dprp_input_size")


def test_the_macs_of_a_pt2_count_attention(tmp_path):
    # the whole-forward count used for .pt2 programs ran the CPU flash kernel: attention counted 0 MACs
    from dprp_surgery.cli.commands import _macs
    from dprp_surgery.io import load_model

    class Attention(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    x = torch.randn(1, 2, 5, 4)
    torch.export.save(torch.export.export(Attention(), (x,)), str(tmp_path / "a.pt2"))
    program, _ = load_model(tmp_path / "a.pt2")
    assert _macs(program, x)[0] == 2 * 2 * 5 * 5 * 4


@pytest.mark.parametrize("meta", [{"input_size": [True, True, True]}, {"mean": [float("nan")] * 3, "std": [1.0] * 3},
                                  {"mean": [0.5], "std": [0.5], "input_size": [3, 8, 8]}, "not json", [1, 2]])
def test_a_malformed_pt2_record_is_ignored(tmp_path, meta):
    from dprp_surgery.io import data_recipe, load_model

    path = tmp_path / "m.pt2"
    program = torch.export.export(resnet20(), (torch.zeros(2, 3, 32, 32),))
    text = meta if isinstance(meta, str) else json.dumps(meta)
    torch.export.save(program, str(path), extra_files={"dprp.json": text})
    model, arch = load_model(path)
    assert data_recipe(arch, model).source == "ImageNet defaults"  # no normalisation taken from it
    size_given = isinstance(meta, dict) and meta.get("input_size") == [3, 8, 8]  # valid: kept without the mean
    assert getattr(model, "_dprp_input_size", None) == ([3, 8, 8] if size_given else None)


def test_help_lists_pt2_and_onnx_only_where_they_work():
    for command in ("inspect", "compress"):
        assert ".pt2" not in _flat(invoke(command, "--help").output).split("--input-size")[0]
    for command in ("inspect", "compress", "export"):
        assert ".onnx file" not in _flat(invoke(command, "--help").output)
    assert ".pt2 file" in _flat(invoke("eval", "--help").output)
    assert ".onnx file" in _flat(invoke("eval", "--help").output)


def test_the_help_lists_the_exit_codes_the_commands_use():
    out = _flat(invoke("--help").output)
    assert "Exit codes: 0 success, 2 bad usage or input, 1 failure during the work" in out and "130 interrupted" in out


def test_eval_and_compress_note_when_the_recipe_enlarges_small_images(tmp_path, data_dir):
    # 32-px images went to a timm model's 224 px (here resnet10t's 176) with no word of the 30x compute
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "r10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=2).state_dict(), str(weights))
    spec = f"timm:resnet10t@{weights}"
    out = _flat(invoke("eval", spec, "--data", data_dir, "--no-latency", "--limit", "4").output)
    assert "are 32x32; they are resized to 176x176, the input size of timm:resnet10t" in out
    assert "30x the pixels" in out and "Pass --image-size 32 to evaluate at their own size" in out
    result = invoke("eval", spec, "--data", data_dir, "--no-latency", "--limit", "4", "--image-size", "32")
    assert result.exit_code == 0 and "they are resized" not in _flat(result.output)
    result = invoke("eval", "cifar:resnet20", "--data", data_dir, "--no-latency", "--limit", "4")
    assert result.exit_code == 0 and "they are resized" not in _flat(result.output)  # CIFAR models take 32 px
    result = invoke("compress", spec, "--data", data_dir, "--out", tmp_path / "run", "--epochs", "1",
                    "--limit-train", "4", "--limit-val", "2", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    assert "Pass --image-size 32 to train at their own size" in _flat(result.output)
