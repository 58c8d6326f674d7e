"""`cnncodes finetune` with untrained weights and tiny images: phases, resume, predict, compare."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import cnncodes
from cnncodes.cli import app
from cnncodes.finetune import TRUNK_DIR, RichProgress, build_model, cached_top, cut_layer, finetune, set_trainable
from cnncodes.preprocessing import Preprocess
from cnncodes.weights import Weights

from .conftest import make_dataset, needs_real_weights

runner = CliRunner()
TINY = dict(backbone="vgg16", weights="none", image_size=32, batch_size=8, head_epochs=1, fine_epochs=1,
            progress=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    data = make_dataset(root / "data", per_class=8)
    cnncodes.extract(data, root / "features", backbone="vgg16", weights="none", image_size=32, progress=False)
    result = runner.invoke(app, ["finetune", str(data), "--out", str(root / "models"), "--split-from",
                                 str(root / "features"), "--backbone", "vgg16", "--weights", "none", "--image-size",
                                 "32", "--batch-size", "8", "--head-epochs", "2", "--fine-epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "features": root / "features", "models": root / "models"}


def test_finetune_writes_a_model_and_a_run_record_on_the_features_split(tuned):
    record = json.loads((tuned["models"] / "vgg16-finetune.json").read_text())
    meta = json.loads((tuned["features"] / "meta.json").read_text())
    assert record["method"] == "finetune" and record["backbone"] == "vgg16"
    assert record["dataset"]["split_fingerprint"] == meta["split"]["fingerprint"]
    assert record["n_test"] == meta["subsets"].count("test") == len(record["test_predictions"])
    assert record["epochs_run"] == len(record["history"]) >= 2
    assert [h["phase"] for h in record["history"]][0] == "head" and record["history"][-1]["phase"] == "fine"
    assert {"accuracy", "val_accuracy", "loss"} <= set(record["history"][0])
    assert record["params"]["trainable_weights"] == {"head": 2, "fine": 8}  # head, then + block5's 3 convs
    assert (tuned["models"] / "vgg16-finetune.keras").stat().st_size == record["model_bytes"]
    assert not (tuned["models"] / ".finetune" / "vgg16-finetune").exists()


def test_predict_with_the_keras_model_reproduces_the_recorded_test_predictions(tuned):
    model = tuned["models"] / "vgg16-finetune.keras"
    record = json.loads(model.with_suffix(".json").read_text())
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    for runtime in ("onnx", "keras"):
        result = runner.invoke(app, ["predict", str(model), *images, "--format", "json", "--runtime", runtime,
                                     "--quiet"])
        assert result.exit_code == 0, result.output
        answers = json.loads(result.stdout)
        assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]
        np.testing.assert_allclose([a["probability"] for a in answers],
                                   [p["probability"] for p in record["test_predictions"]], atol=1e-4)


def test_compare_ranks_finetune_beside_cnn_codes_runs(tuned):
    fit = runner.invoke(app, ["fit-svm", str(tuned["features"]), "--out", str(tuned["models"]), "--classifier",
                              "logreg", "--cv", "2", "--quiet"])
    assert fit.exit_code == 0, fit.output
    listed = json.loads(runner.invoke(app, ["compare", str(tuned["models"]), "--format", "json"]).stdout)
    assert {r["method"] for r in listed} == {"finetune", "cnn-codes"}


@pytest.mark.parametrize(("backbone", "after", "trainable", "frozen"), [
    ("vgg16", "block4_pool", ["block5_conv1", "block5_conv3"], ["block4_conv3", "block1_conv1"]),
    ("resnet50", "conv4_block6_out", ["conv5_block1_1_conv", "conv5_block3_3_conv"],
     ["conv4_block6_3_conv", "conv5_block1_1_bn", "conv5_block3_3_bn"]),
    ("vgg16", "2", ["block5_pool", "block5_conv3"], ["block5_conv2"]),
])
def test_phase_two_unfreezes_the_top_block_and_keeps_batchnorm_frozen(backbone, after, trainable, frozen):
    entry = cnncodes.backbones.get_backbone(backbone)
    _, network = build_model(entry, 32, 3, Weights("none"), 0.2)
    set_trainable(network, None)
    assert not network.trainable_weights
    set_trainable(network, after)
    assert network.trainable_weights
    for name in trainable:
        assert network.get_layer(name).trainable, name
    for name in frozen:
        assert not network.get_layer(name).trainable, name


@pytest.mark.parametrize("options", [{}, {"cache_trunk": True, "class_weight": "balanced"}])
def test_interrupted_finetune_resumes_and_refuses_other_arguments(tmp_path, monkeypatch, options):
    data = make_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "models"
    real_end = RichProgress.on_epoch_end

    def interrupt_in_fine_phase(self, epoch, logs=None):
        real_end(self, epoch, logs)
        if "fine" in self.description:
            raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "on_epoch_end", interrupt_in_fine_phase)
    arguments = TINY | dict(fine_epochs=2, patience=5) | options
    with pytest.raises(KeyboardInterrupt):
        finetune(data, out, **arguments)
    monkeypatch.undo()
    assert (out / ".finetune" / "vgg16-finetune" / "head.json").is_file()
    assert not (out / "vgg16-finetune.keras").exists()
    with pytest.raises(cnncodes.CnnCodesError, match="other arguments"):
        finetune(data, out, **(arguments | dict(lr=1e-3)), resume=True)
    record = finetune(data, out, **arguments, resume=True)
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("head", 1), ("fine", 1), ("fine", 2)]
    assert record["epochs_run"] == 3 and (out / "vgg16-finetune.keras").is_file()
    assert (out / "split.csv").is_file()


def test_finetune_refuses_a_learning_rate_that_is_not_positive(tmp_path):
    result = runner.invoke(app, ["finetune", str(tmp_path), "--out", str(tmp_path / "models"), "--lr", "-1"])
    assert result.exit_code == 2 and "learning rates positive" in result.output
    assert not (tmp_path / "models").exists()


def test_finetune_reads_a_csv_dataset(tmp_path):
    data = make_dataset(tmp_path / "images", per_class=6)
    listing = tmp_path / "list.csv"
    rows = sorted(data.rglob("*.*"))
    listing.write_text("path,label\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in rows))
    record = finetune(listing, tmp_path / "models", **(TINY | dict(fine_epochs=0)))
    assert record["n_train"] + record["n_test"] < len(rows) and record["dataset"]["data"] == str(tmp_path.resolve())


@pytest.mark.parametrize("backbone", list(cnncodes.backbones.REGISTRY))
def test_the_model_on_cached_trunk_activations_equals_the_whole_model(backbone):
    entry = cnncodes.backbones.get_backbone(backbone)
    size = max(32, entry.min_size)
    model, network = build_model(entry, size, 3, Weights("none"), 0.2)
    cut = cut_layer(network, entry.finetune_after)
    assert cut == entry.finetune_after
    model.get_layer("head").set_weights([np.random.default_rng(0).normal(size=w.shape) for w in
                                         model.get_layer("head").get_weights()])
    pixels = np.random.default_rng(1).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    preprocessed = Preprocess(backbone)(pixels)
    trunk = keras.Model(network.inputs, network.get_layer(cut).output)
    top = cached_top(model, network, cut)
    np.testing.assert_allclose(top.predict(trunk.predict(preprocessed, verbose=0), verbose=0),
                               model.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)
    set_trainable(network, cut)
    assert {id(w) for w in top.trainable_weights} == {id(w) for w in model.trainable_weights}


def test_cache_trunk_cuts_before_the_unfrozen_layers_and_refuses_a_cut_inside_a_residual_block():
    vgg, vgg_network = build_model(cnncodes.backbones.get_backbone("vgg16"), 32, 3, Weights("none"), 0.2)
    assert cut_layer(vgg_network, "2") == "block5_conv2"
    with pytest.raises(cnncodes.CnnCodesError, match="no frozen layer"):
        cut_layer(vgg_network, "99")
    with pytest.raises(cnncodes.CnnCodesError, match="--fine-epochs 0"):
        cut_layer(vgg_network, "0")
    model, network = build_model(cnncodes.backbones.get_backbone("resnet50"), 32, 3, Weights("none"), 0.2)
    with pytest.raises(cnncodes.CnnCodesError, match="residual connection"):
        cached_top(model, network, cut_layer(network, "conv5_block1_1_conv"))


def test_cache_trunk_trains_on_cached_activations_and_its_model_predicts_the_same(tuned):
    models = tuned["root"] / "trunk-models"
    args = ["finetune", str(tuned["data"]), "--out", str(models), "--split-from", str(tuned["features"]),
            "--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--head-epochs", "1", "--fine-epochs", "2", "--cache-trunk", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((models / "vgg16-finetune.json").read_text())
    assert record["params"]["cache_trunk"] and not record["params"]["augment"]
    assert record["params"]["trainable_weights"] == {"head": 2, "fine": 8}
    assert [h["phase"] for h in record["history"]] == ["head", "fine", "fine"]
    trunk = json.loads((models / TRUNK_DIR / "vgg16-block4_pool-32-crop-untrained" / "meta.json").read_text())
    assert trunk["dim"] == 2 * 2 * 512 and trunk["extractor"]["pooling"] == "flatten"
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    answers = json.loads(runner.invoke(app, ["predict", str(models / "vgg16-finetune.keras"), *images, "--format",
                                             "json", "--quiet"]).stdout)
    np.testing.assert_allclose([a["probability"] for a in answers],
                               [p["probability"] for p in record["test_predictions"]], atol=1e-4)
    again = runner.invoke(app, args + ["--augment"])
    assert again.exit_code == 2 and "cannot augment" in again.output


def test_smallcnn_trains_from_scratch_in_one_phase_and_predicts(tuned):
    models = tuned["root"] / "scratch-models"
    args = ["finetune", str(tuned["data"]), "--out", str(models), "--split-from", str(tuned["features"]),
            "--backbone", "smallcnn", "--image-size", "16", "--batch-size", "8", "--head-epochs", "2",
            "--fine-epochs", "1", "--quiet"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--weights none" in refused.output
    result = runner.invoke(app, args + ["--weights", "none"])
    assert result.exit_code == 0, result.output
    record = json.loads((models / "smallcnn-scratch.json").read_text())
    assert record["method"] == "from-scratch" and record["extractor"]["image_size"] == 16
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("scratch", 1), ("scratch", 2), ("scratch", 3)]
    assert record["params"]["trainable_weights"] == {"scratch": 8}  # 2 convs + 2 dense, kernel + bias
    assert "lr" not in record["params"] and "dropout" not in record["params"]  # settings it does not use
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    answers = json.loads(runner.invoke(app, ["predict", str(models / "smallcnn-scratch.keras"), *images, "--format",
                                             "json", "--quiet"]).stdout)
    assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]
    listed = json.loads(runner.invoke(app, ["compare", str(models), str(tuned["models"]), "--format", "json"]).stdout)
    assert "from-scratch" in {r["method"] for r in listed}


@needs_real_weights
def test_demo_runs_the_whole_pipeline_on_given_images(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=10)
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", str(data), "--out", str(out), "--image-size", "32"])
    assert result.exit_code == 0, result.output
    listed = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    assert {r["method"] for r in listed} == {"cnn-codes", "finetune"} and len(listed) == 5
    tuned = next(r for r in listed if r["method"] == "finetune")
    assert tuned["params"]["cache_trunk"] and tuned["epochs_run"] >= 2
    assert (out / "report.html").is_file() and "top 3" in result.output
