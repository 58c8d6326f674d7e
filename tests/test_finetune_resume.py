"""Fine-tunes that stop before their end: resume, restart, backups written while a signal or a kill strikes."""

from __future__ import annotations

import importlib
import json
import os
import signal
from pathlib import Path

import keras
import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app
from cnncodes.finetuning import phases
from cnncodes.finetuning.callbacks import CheckedBackup, ResumableEarlyStopping
from cnncodes.finetuning.train import finetune

from .helpers import TINY_ARGS, fast_spec, make_dataset, needs_real_weights, runner, tiny_spec


class InterruptAtEpoch(keras.callbacks.Callback):
    """Ctrl-C at the end of the n-th epoch of the run (counted across phases)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.seen = n, 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("options", "traced"), [({}, False), ({"cache_trunk": True, "class_weight": "balanced"}, True)]
)
@pytest.mark.slow
def test_interrupted_finetune_resumes_and_refuses_other_arguments(tmp_path, monkeypatch, options, traced):
    if traced:  # as a real run of more than a few steps is: its functions traced into graphs
        monkeypatch.setattr(phases, "EAGER_STEPS", -1)
    data = make_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "models"
    spec = tiny_spec(fine_epochs=2, patience=5, **options)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, out, spec, callbacks=[InterruptAtEpoch(2)], progress=False)  # in the fine phase's first epoch
    assert (out / ".finetune" / "vgg16-finetune" / "head.json").is_file()
    assert not (out / "vgg16-finetune.keras").exists()
    with pytest.raises(cnncodes.CnnCodesError, match=r"resume .* or restart"):
        finetune(data, out, spec, progress=False)
    with pytest.raises(cnncodes.CnnCodesError, match="other arguments"):
        finetune(data, out, tiny_spec(fine_epochs=2, patience=5, lr=1e-3, **options), resume=True, progress=False)
    record = finetune(data, out, spec, resume=True, progress=False)
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("head", 1), ("fine", 1), ("fine", 2)]
    assert record["fit_seconds"] == round(sum(h["seconds"] for h in record["history"]), 3) > 0
    assert record["epochs_run"] == 3 and (out / "vgg16-finetune.keras").is_file()
    assert (out / "split.csv").is_file() and not (out / ".finetune" / "vgg16-finetune").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".vgg16")) == []  # no temporary files left


@pytest.mark.slow
def test_a_run_interrupted_in_its_first_phase_resumes_with_every_epoch_of_the_second(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    spec = tiny_spec(head_epochs=2, fine_epochs=2, patience=5)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, tmp_path / "models", spec, callbacks=[InterruptAtEpoch(1)], progress=False)
    record = finetune(data, tmp_path / "models", spec, resume=True, progress=False)
    phases = [(h["phase"], h["epoch"]) for h in record["history"]]
    assert phases == [("head", 1), ("head", 2), ("fine", 1), ("fine", 2)]  # the restored epoch is the head's only


class Terminated(Exception):
    """What the test's own SIGTERM handler raises, so that a deferred `kill` shows where it was delivered."""


def _terminated(*_):
    raise Terminated


@pytest.mark.parametrize(
    ("signum", "handler", "raised"),
    [(signal.SIGINT, signal.default_int_handler, KeyboardInterrupt), (signal.SIGTERM, _terminated, Terminated)],
)
@pytest.mark.slow
def test_a_signal_while_an_epoch_is_backed_up_waits_for_the_backup(tmp_path, monkeypatch, signum, handler, raised):
    original = CheckedBackup.on_epoch_end

    def interrupted_while_writing(self, epoch, logs=None):
        os.kill(os.getpid(), signum)  # Ctrl-C or `kill` just as the backup starts
        original(self, epoch, logs)

    monkeypatch.setattr(CheckedBackup, "on_epoch_end", interrupted_while_writing)
    data, out = make_dataset(tmp_path / "data", per_class=6), tmp_path / "models"
    before = signal.signal(signum, handler)  # a shell that started the tests in the background ignores Ctrl-C
    try:
        with pytest.raises(raised):
            finetune(data, out, tiny_spec(head_epochs=2), progress=False)
        assert signal.getsignal(signum) is handler  # the signal has its handler back
    finally:
        signal.signal(signum, before)
    backup = out / ".finetune" / "vgg16-finetune" / "head-backup"
    assert any(backup.rglob("*.weights.h5")), "the interrupted epoch's backup was not finished"
    monkeypatch.undo()
    record = finetune(data, out, tiny_spec(head_epochs=2), resume=True, progress=False)
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("head", 1), ("head", 2), ("fine", 1)]


@pytest.mark.slow
def test_a_kill_while_a_backup_is_written_leaves_the_previous_epochs_whole(tmp_path, monkeypatch):
    """SIGKILL cannot be held: a backup half written when it struck must not replace the last whole one."""
    original, written = keras.Model.save_weights, []

    def killed_mid_write(self, filepath, *args, **kwargs):
        written.append(filepath)
        if len(written) == 2:  # the second epoch's backup
            Path(filepath).write_bytes(b"\x89HDF\r\n\x1a\n half a file")
            raise SystemExit("killed")
        return original(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", killed_mid_write)
    data, out = make_dataset(tmp_path / "data", per_class=6), tmp_path / "models"
    with pytest.raises(SystemExit):
        finetune(data, out, tiny_spec(head_epochs=3), progress=False)
    monkeypatch.undo()
    record = finetune(data, out, tiny_spec(head_epochs=3), resume=True, progress=False)
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("head", 1), ("head", 2), ("head", 3), ("fine", 1)]
    assert not list(out.glob(".finetune")), "the checkpoints outlived the finished run"


@pytest.mark.slow
def test_a_backup_damaged_by_a_kill_is_one_error_line_and_restart_recovers(tmp_path):
    data, out, spec = make_dataset(tmp_path / "data", per_class=6), tmp_path / "models", tiny_spec(head_epochs=2)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, out, spec, callbacks=[InterruptAtEpoch(1)], progress=False)
    backup = out / ".finetune" / "vgg16-finetune" / "head-backup"
    weights = backup / "latest.weights.h5"
    whole = weights.read_bytes()
    for damaged in (weights, backup / "training_metadata.json"):  # each alone, the other whole
        damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # cut short, as by a kill mid-write
        with pytest.raises(cnncodes.CnnCodesError, match=r"head-backup is damaged \(.+\).*run again with restart"):
            finetune(data, out, spec, resume=True, progress=False)
        weights.write_bytes(whole)
    assert finetune(data, out, spec, restart=True, progress=False)["epochs_run"] == 3


@pytest.mark.slow
def test_restart_discards_an_interrupted_run_and_another_setting_needs_a_name(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "models"
    with pytest.raises(KeyboardInterrupt):
        finetune(data, out, tiny_spec(), callbacks=[InterruptAtEpoch(1)], progress=False)
    first = finetune(data, out, tiny_spec(), restart=True, progress=False)
    assert [h["phase"] for h in first["history"]] == ["head", "fine"]
    assert finetune(data, out, tiny_spec(), progress=False)["origin"] == first["origin"]  # the same run again is fine
    result = runner.invoke(
        app,
        [
            "finetune",
            str(data),
            "--out",
            str(out),
            "--backbone",
            "vgg16",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--head-epochs",
            "1",
            "--fine-epochs",
            "1",
            "--lr",
            "1e-3",
        ],
    )
    assert result.exit_code == 2 and "already holds run vgg16-finetune" in result.output
    assert json.loads((out / "vgg16-finetune.json").read_text())["origin"] == first["origin"]
    named = finetune(data, out, tiny_spec(lr=1e-3), name="fast", progress=False)
    assert named["run"] == "fast-vgg16-finetune" and named["params"]["lr"] == 1e-3


def test_early_stopping_state_survives_a_resume(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = [w.copy() for w in model.get_weights()]
    first = ResumableEarlyStopping(tmp_path / "fine-stopping", patience=3)
    first.set_model(model)
    first.on_train_begin()
    first.on_epoch_end(0, {"val_accuracy": 0.9})
    model.set_weights([w + 1 for w in best])
    first.on_epoch_end(1, {"val_accuracy": 0.5})  # worse: then the run is killed
    resumed = ResumableEarlyStopping(tmp_path / "fine-stopping", patience=3)
    resumed.set_model(model)
    resumed.on_train_begin()
    assert (resumed.best, resumed.wait, resumed.best_epoch) == (0.9, 1, 0)
    resumed.on_epoch_end(2, {"val_accuracy": 0.6})
    resumed.on_train_end()
    for got, want in zip(model.get_weights(), best):
        np.testing.assert_array_equal(got, want)  # the best model found before the kill, not the last one


def test_a_backup_gives_back_the_weights_the_optimizer_state_and_the_epoch_to_start_at(tmp_path):
    """Through Keras's public API only: `fit(initial_epoch=...)`, so a new Keras cannot skip epochs unnoticed."""

    def compiled():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
        return model

    x, y = np.random.default_rng(0).normal(size=(8, 2)), np.arange(8) % 2
    model, backup = compiled(), CheckedBackup(tmp_path / "head-backup")
    model.fit(x, y, epochs=2, callbacks=[backup], verbose=0)
    resumed = compiled()
    assert CheckedBackup(tmp_path / "head-backup").restore(resumed) == 2
    for got, want in zip(resumed.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert int(resumed.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    assert CheckedBackup(tmp_path / "none-yet").restore(compiled()) == 0


@pytest.mark.parametrize("subset", ["train", "test"])
@pytest.mark.slow
def test_an_image_of_the_split_that_no_longer_decodes_is_one_line_and_resume_goes_on(tmp_path, subset):
    data, features, models = make_dataset(tmp_path / "data", per_class=6), tmp_path / "features", tmp_path / "models"
    cnncodes.extract(data, features, fast_spec(), progress=False)
    rows = (features / "split.csv").read_text().splitlines()[1:]
    damaged = data / next(r.split(",")[0] for r in rows if r.endswith(f",{subset}") and ".jpg" in r)
    whole = damaged.read_bytes()
    damaged.write_bytes(whole[:300])  # cut short after extract made the split
    args = ["finetune", str(data), "--out", str(models), "--split-from", str(features), *TINY_ARGS, "-q"]
    args += ["--head-epochs", "2", "--fine-epochs", "1"]
    failed = runner.invoke(app, args)
    assert failed.exit_code == 2 and "Traceback" not in failed.output
    assert f"cannot read {damaged}" in " ".join(failed.output.split()) and "--resume" in failed.output
    damaged.write_bytes(whole)
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    record = json.loads((models / "vgg16-finetune.json").read_text())
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("head", 1), ("head", 2), ("fine", 1)]
    assert record["n_test"] == sum(r.endswith(",test") for r in rows)


@needs_real_weights
@pytest.mark.slow
def test_a_demo_interrupted_while_fine_tuning_goes_on_where_it_stopped(tmp_path, monkeypatch):
    from cnncodes import demo

    data, out, real = make_dataset(tmp_path / "data", per_class=6), tmp_path / "demo", demo.finetune
    trained: list[int] = []

    class Count(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if trained == [0] and os.environ.get("STOP_DEMO"):  # Ctrl-C once the first epoch is saved
                raise KeyboardInterrupt
            trained.append(epoch)

    monkeypatch.setattr(demo, "finetune", lambda *a, **k: real(*a, callbacks=[Count()], **k))
    monkeypatch.setenv("STOP_DEMO", "1")
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(data, out, image_size=32, finetune_epochs=(3, 1))
    monkeypatch.delenv("STOP_DEMO")
    records = demo.run_demo(data, out, image_size=32, finetune_epochs=(3, 1))
    tuned = next(r for r in records if r["method"] == "finetune")
    assert tuned["epochs_run"] == len(trained)  # the first epoch was not trained again


@pytest.mark.slow
def test_ctrl_c_before_the_first_epoch_says_to_run_the_command_again(tmp_path, monkeypatch):
    finetune_module = importlib.import_module("cnncodes.finetuning.train")
    prepare = finetune_module.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # while the trunk's activations are computed

    data = make_dataset(tmp_path / "data", per_class=6)
    args = ["finetune", str(data), "--out", str(tmp_path / "models"), *TINY_ARGS, "--cache-trunk", "--quiet"]
    monkeypatch.setattr(finetune_module, "prepare", interrupted)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "no epoch had started; run the same command again" in result.output
    assert "cached trunk activations are kept" in " ".join(result.output.split())
    plain = runner.invoke(app, [a for a in args if a != "--cache-trunk"])
    assert plain.exit_code == 130 and "no epoch had started" in plain.output and "cached trunk" not in plain.output
    monkeypatch.setattr(finetune_module, "prepare", prepare)
    assert runner.invoke(app, args).exit_code == 0  # as it says: no --resume needed
