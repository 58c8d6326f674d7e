"""`cnncodes finetune` with untrained weights and tiny images: phases, records, predict, compare, the demo."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app
from cnncodes.core.errors import CnnCodesWarning
from cnncodes.finetuning.data import TRUNK_DIR
from cnncodes.finetuning.spec import parse_unfreeze
from cnncodes.finetuning.surgery import cached_top, cut_layer, first_unfrozen, set_trainable
from cnncodes.finetuning.train import finetune
from cnncodes.nets.models import build_classifier
from cnncodes.nets.preprocessing import Preprocess
from cnncodes.nets.weights import Weights

from .helpers import TINY_ARGS, fast_spec, make_dataset, needs_real_weights, runner, tiny_spec, write_image


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetune")
    data = make_dataset(root / "data", per_class=8)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    args = ["finetune", str(data), "--out", str(root / "models"), "--split-from", str(root / "features"), *TINY_ARGS]
    result = runner.invoke(app, [*args, "--head-epochs", "2", "--fine-epochs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "features": root / "features", "models": root / "models"}


@pytest.mark.slow
def test_finetune_writes_a_model_and_a_run_record_on_the_features_split(tuned):
    record = json.loads((tuned["models"] / "vgg16-finetune.json").read_text())
    meta = json.loads((tuned["features"] / "meta.json").read_text())
    assert record["method"] == "finetune" and record["backbone"] == "vgg16"
    assert record["dataset"]["split_fingerprint"] == meta["split"]["fingerprint"]
    assert record["n_test"] == meta["split"]["counts"]["test"] == len(record["test_predictions"])
    assert record["epochs_run"] == len(record["history"]) >= 2
    assert next(h["phase"] for h in record["history"]) == "head" and record["history"][-1]["phase"] == "fine"
    assert {"accuracy", "val_accuracy", "loss"} <= set(record["history"][0])
    assert record["params"]["trainable_weights"] == {"head": 2, "fine": 8}  # head, then + block5's 3 convs
    assert (tuned["models"] / "vgg16-finetune.keras").stat().st_size == record["model_bytes"]
    assert not (tuned["models"] / ".finetune").exists()  # checkpoints go once the record is published
    with zipfile.ZipFile(tuned["models"] / "vgg16-finetune.keras") as saved:  # no optimizer state to ship
        weights = h5py.File(io.BytesIO(saved.read("model.weights.h5")), "r")
        assert "optimizer" not in weights and not json.loads(saved.read("config.json")).get("compile_config")


@pytest.mark.slow
def test_a_keras_model_whose_record_was_edited_to_another_size_or_classes_is_refused(tuned, tmp_path):
    record = json.loads((tuned["models"] / "vgg16-finetune.json").read_text())
    image = str(tuned["data"] / record["test_predictions"][0]["path"])
    one_more = {  # a class added consistently, so the record itself is valid and only the model disagrees
        "classes": [*record["classes"], "x"],
        "per_class": record["per_class"] | {"x": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}},
        "confusion_matrix": [[*row, 0] for row in record["confusion_matrix"]] + [[0] * (len(record["classes"]) + 1)],
    }
    for edit in ({"extractor": {**record["extractor"], "image_size": 64}}, one_more):
        model = tmp_path / "vgg16-finetune.keras"
        model.write_bytes((tuned["models"] / "vgg16-finetune.keras").read_bytes())
        model.with_suffix(".json").write_text(json.dumps(record | edit))
        for runtime in ("onnx", "keras"):
            result = runner.invoke(app, ["predict", str(model), image, "--runtime", runtime, "--quiet"])
            assert result.exit_code == 2 and "the record was changed" in result.stderr, result.output


@pytest.mark.slow
def test_predict_with_the_keras_model_reproduces_the_recorded_test_predictions(tuned):
    model = tuned["models"] / "vgg16-finetune.keras"
    record = json.loads(model.with_suffix(".json").read_text())
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    for runtime in ("onnx", "keras"):
        result = runner.invoke(
            app, ["predict", str(model), *images, "--format", "json", "--runtime", runtime, "--quiet"]
        )
        assert result.exit_code == 0, result.output
        answers = json.loads(result.stdout)
        assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]
        np.testing.assert_allclose(
            [a["probability"] for a in answers], [p["probability"] for p in record["test_predictions"]], atol=1e-4
        )


@pytest.mark.slow
def test_compare_ranks_finetune_beside_cnn_codes_runs(tuned):
    fit = runner.invoke(
        app,
        [
            "fit-svm",
            str(tuned["features"]),
            "--out",
            str(tuned["models"]),
            "--classifier",
            "logreg",
            "--cv",
            "2",
            "--quiet",
        ],
    )
    assert fit.exit_code == 0, fit.output
    listed = json.loads(runner.invoke(app, ["compare", str(tuned["models"]), "--format", "json"]).stdout)
    assert {r["method"] for r in listed} == {"finetune", "cnn-codes"}


@pytest.mark.parametrize(
    ("backbone", "after", "trainable", "frozen"),
    [
        ("vgg16", "block4_pool", ["block5_conv1", "block5_conv3"], ["block4_conv3", "block1_conv1"]),
        (
            "resnet50",
            "conv4_block6_out",
            ["conv5_block1_1_conv", "conv5_block3_3_conv"],
            ["conv4_block6_3_conv", "conv5_block1_1_bn", "conv5_block3_3_bn"],
        ),
        ("vgg16", "2", ["block5_pool", "block5_conv3"], ["block5_conv2"]),
    ],
)
def test_phase_two_unfreezes_the_top_block_and_keeps_batchnorm_frozen(backbone, after, trainable, frozen):
    entry = cnncodes.nets.backbones.get_backbone(backbone)
    _, network = build_classifier(entry, 32, 3, Weights("none"), 0.2)
    set_trainable(network, None)
    assert not network.trainable_weights
    set_trainable(network, first_unfrozen(network, parse_unfreeze(after)))
    assert network.trainable_weights
    for name in trainable:
        assert network.get_layer(name).trainable, name
    for name in frozen:
        assert not network.get_layer(name).trainable, name


@pytest.mark.slow
def test_the_split_has_its_own_seed_and_follows_extract(tuned, tmp_path):
    meta = json.loads((tuned["features"] / "meta.json").read_text())
    record = finetune(tuned["data"], tmp_path / "a", tiny_spec(seed=7, fine_epochs=0), progress=False)
    assert record["dataset"]["split_fingerprint"] == meta["split"]["fingerprint"]
    other = finetune(tuned["data"], tmp_path / "b", tiny_spec(fine_epochs=0), split_seed=3, progress=False)
    assert other["dataset"]["split_fingerprint"] != meta["split"]["fingerprint"]


@pytest.mark.slow
def test_finetune_refuses_a_learning_rate_that_is_not_positive_or_a_training_that_diverges(tmp_path):
    for rate in ("-1", "nan", "inf"):
        result = runner.invoke(app, ["finetune", str(tmp_path), "--out", str(tmp_path / "models"), "--lr", rate])
        assert result.exit_code == 2 and "learning rates positive numbers" in result.output
    assert not (tmp_path / "models").exists()
    data = make_dataset(tmp_path / "data", per_class=6)
    args = ["finetune", str(data), "--out", str(tmp_path / "m"), *TINY_ARGS, "--fine-epochs", "0", "-q"]
    diverged = runner.invoke(app, [*args, "--head-epochs", "1", "--head-lr", "1e38"])
    assert diverged.exit_code == 2 and "training diverged" in diverged.stderr and "Traceback" not in diverged.output


def test_make_spec_checks_what_the_command_line_checks():
    """A notebook's make_spec() gets the command line's one-line errors, before any image is read."""
    for bad, words in (
        ({"dropout": 1.5}, "^dropout takes 0 to 0.99"),  # the parameters, in Python
        ({"patience": -2}, " patience 1 or more"),
        ({"unfreeze": 1.5}, "unfreeze must be a string or an integer or None"),
    ):
        with pytest.raises(cnncodes.CnnCodesError, match=words):
            tiny_spec(**bad)
    assert tiny_spec(unfreeze=3).unfreeze == tiny_spec(unfreeze="3").unfreeze == 3  # the last 3 layers, as a number too


@pytest.mark.slow
def test_finetune_reads_a_csv_dataset_and_says_which_files_it_skipped(tmp_path):
    data = make_dataset(tmp_path / "images", per_class=6)
    listing = tmp_path / "list.csv"
    rows = sorted(data.rglob("*.*"))
    (tmp_path / "images" / "cut.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    listing.write_text(
        "path,label\nimages/cut.jpg,circles\n" + "".join(f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in rows)
    )
    with pytest.warns(CnnCodesWarning, match=r"skipped 1 file\(s\) \(1 not an image\): see"):
        record = finetune(listing, tmp_path / "models", tiny_spec(fine_epochs=0), progress=False)
    assert (tmp_path / "models" / "rejected.csv").read_text().splitlines()[1].startswith("images/cut.jpg,")
    split = (tmp_path / "models" / "split.csv").read_text().splitlines()[1:]
    assert len(split) == len(rows) and record["n_test"] == sum(line.endswith(",test") for line in split)
    assert record["n_train"] == sum(line.endswith(",train") for line in split)
    assert record["dataset"]["data"] == str(tmp_path.resolve())


@pytest.mark.parametrize("backbone", list(cnncodes.nets.backbones.REGISTRY))
@pytest.mark.slow
def test_the_model_on_cached_trunk_activations_equals_the_whole_model(backbone):
    entry = cnncodes.nets.backbones.get_backbone(backbone)
    size = max(32, entry.min_size)
    model, network = build_classifier(entry, size, 3, Weights("none"), 0.2)
    start = first_unfrozen(network, entry.finetune_after)
    cut = cut_layer(network, start)
    assert cut == entry.finetune_after
    model.get_layer("head").set_weights(
        [np.random.default_rng(0).normal(size=w.shape) for w in model.get_layer("head").get_weights()]
    )
    pixels = np.random.default_rng(1).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    preprocessed = Preprocess(backbone)(pixels)
    trunk = keras.Model(network.inputs, network.get_layer(cut).output)
    top = cached_top(model, network, cut)
    np.testing.assert_allclose(
        top.predict(trunk.predict(preprocessed, verbose=0), verbose=0),
        model.predict(pixels, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    set_trainable(network, start)
    assert {id(w) for w in top.trainable_weights} == {id(w) for w in model.trainable_weights}


def test_cache_trunk_cuts_before_the_unfrozen_layers_and_refuses_a_cut_inside_a_residual_block():
    _vgg, vgg_network = build_classifier(cnncodes.nets.backbones.get_backbone("vgg16"), 32, 3, Weights("none"), 0.2)
    assert cut_layer(vgg_network, first_unfrozen(vgg_network, 2)) == "block5_conv2"
    with pytest.raises(cnncodes.CnnCodesError, match="no frozen layer"):
        cut_layer(vgg_network, first_unfrozen(vgg_network, len(vgg_network.layers)))
    with pytest.raises(cnncodes.CnnCodesError, match="last layer: nothing after it would train"):
        first_unfrozen(vgg_network, vgg_network.layers[-1].name)  # as --unfreeze 0
    assert (
        tiny_spec(unfreeze=5).described["layer"] == "last 5 layers"
        and tiny_spec().described["layer"] == "after block4_pool"
    )
    with pytest.raises(cnncodes.CnnCodesError, match=f"has {len(vgg_network.layers)} layers, give at most that"):
        first_unfrozen(vgg_network, 99)
    with pytest.raises(cnncodes.CnnCodesError, match="fine_epochs 0"):
        tiny_spec(unfreeze="0")
    for epochs in ((0, 0), (-1, 5)):
        with pytest.raises(cnncodes.CnnCodesError, match="take 0 or more epochs, at least one in all"):
            tiny_spec(head_epochs=epochs[0], fine_epochs=epochs[1])
    with pytest.raises(cnncodes.CnnCodesError, match="give one of them"):
        cnncodes.finetune("data", "out", tiny_spec(), resume=True, restart=True)
    model, network = build_classifier(cnncodes.nets.backbones.get_backbone("resnet50"), 32, 3, Weights("none"), 0.2)
    with pytest.raises(cnncodes.CnnCodesError, match="residual connection"):
        cached_top(model, network, cut_layer(network, first_unfrozen(network, "conv5_block1_1_conv")))


@pytest.mark.slow
def test_cache_trunk_trains_on_cached_activations_and_its_model_predicts_the_same(tuned):
    models = tuned["root"] / "trunk-models"
    args = ["finetune", str(tuned["data"]), "--out", str(models), "--split-from", str(tuned["features"]), *TINY_ARGS]
    args += ["--head-epochs", "1", "--fine-epochs", "2", "--cache-trunk", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((models / "vgg16-finetune.json").read_text())
    assert record["params"]["cache_trunk"] and not record["params"]["augment"]
    assert record["params"]["trainable_weights"] == {"head": 2, "fine": 8}
    assert [h["phase"] for h in record["history"]] == ["head", "fine", "fine"]
    trunk = json.loads((models / TRUNK_DIR / "vgg16-block4_pool-32-crop-untrained" / "meta.json").read_text())
    assert trunk["dim"] == 2 * 2 * 512 and trunk["extractor"]["pooling"] == "flatten"
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    answers = json.loads(
        runner.invoke(
            app, ["predict", str(models / "vgg16-finetune.keras"), *images, "--format", "json", "--quiet"]
        ).stdout
    )
    np.testing.assert_allclose(
        [a["probability"] for a in answers], [p["probability"] for p in record["test_predictions"]], atol=1e-4
    )
    again = runner.invoke(app, [*args, "--augment"])
    assert again.exit_code == 2 and "cannot augment" in again.output


@pytest.mark.slow
def test_repeats_train_on_other_splits_of_the_features_and_record_mean_and_sd(tuned, tmp_path):
    with pytest.raises(cnncodes.CnnCodesError, match="split_from"):
        finetune(tuned["data"], tmp_path / "x", tiny_spec(), repeats=2, progress=False)
    record = finetune(
        tuned["data"],
        tmp_path / "models",
        tiny_spec(cache_trunk=True, fine_epochs=0),
        repeats=3,
        split_from=tuned["features"],
        progress=False,
    )
    seeds = [r["seed"] for r in record["repeats"]]
    assert seeds == [0, 1, 2] and record["repeats"][0]["accuracy"] == record["accuracy"]
    assert record["repeats"][0]["n_test"] == record["n_test"]
    accuracies = [r["accuracy"] for r in record["repeats"]]
    assert record["accuracy_mean"] == pytest.approx(np.mean(accuracies))
    assert record["accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert record["repeats"][0]["ece"] == record["ece"]
    assert record["ece_mean"] == pytest.approx(np.mean([r["ece"] for r in record["repeats"]]))
    assert not (tmp_path / "models" / ".finetune" / "vgg16-finetune").exists()


@pytest.mark.slow
def test_smallcnn_trains_from_scratch_in_one_phase_and_predicts(tuned):
    models = tuned["root"] / "scratch-models"
    args = [
        "finetune",
        str(tuned["data"]),
        "--out",
        str(models),
        "--split-from",
        str(tuned["features"]),
        "--backbone",
        "smallcnn",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--head-epochs",
        "2",
        "--fine-epochs",
        "1",
        "--quiet",
    ]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--weights none" in refused.output
    result = runner.invoke(app, [*args, "--weights", "none"])
    assert result.exit_code == 0, result.output
    record = json.loads((models / "smallcnn-scratch.json").read_text())
    assert record["method"] == "from-scratch" and record["extractor"]["image_size"] == 16
    assert [(h["phase"], h["epoch"]) for h in record["history"]] == [("scratch", 1), ("scratch", 2), ("scratch", 3)]
    assert record["params"]["trainable_weights"] == {"scratch": 8}  # 2 convs + 2 dense, kernel + bias
    assert set(record["params"]) == {
        "image_size",
        "resize",
        "batch_size",
        "epochs",
        "lr",
        "augment",
        "class_weight",
        "patience",
        "seed",
        "trainable_weights",
    }  # only the settings it uses
    images = [str(tuned["data"] / p["path"]) for p in record["test_predictions"]]
    answers = json.loads(
        runner.invoke(
            app, ["predict", str(models / "smallcnn-scratch.keras"), *images, "--format", "json", "--quiet"]
        ).stdout
    )
    assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]
    listed = json.loads(runner.invoke(app, ["compare", str(models), str(tuned["models"]), "--format", "json"]).stdout)
    assert "from-scratch" in {r["method"] for r in listed}


@needs_real_weights
@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_on_given_images(demo_run, tmp_path):
    data, out, said = demo_run["data"], demo_run["out"], demo_run["output"]
    listed = json.loads(runner.invoke(app, ["compare", str(out), "--format", "json"]).stdout)
    assert {r["method"] for r in listed} == {"cnn-codes", "finetune"} and len(listed) == 5
    tuned = next(r for r in listed if r["method"] == "finetune")
    assert tuned["params"]["cache_trunk"] and tuned["epochs_run"] >= 2
    assert (out / "report.html").is_file() and "top 3" in said
    shown = said.count(", top 3: ")
    assert 1 <= shown <= 8 and f"on {shown} test images it never saw" in " ".join(said.split())
    other = make_dataset(tmp_path / "other", per_class=4)
    before = (out / "features" / "meta.json").read_bytes()
    refused = runner.invoke(app, ["demo", str(other), "--out", str(out), "--image-size", "32"])
    assert refused.exit_code == 2 and f"already holds a demo of {data.resolve()}" in refused.output
    assert (out / "features" / "meta.json").read_bytes() == before  # checked before anything was written


def test_the_demo_folder_is_claimed_for_one_dataset(tmp_path):
    from cnncodes.demo import claim_output

    data, other = tmp_path / "flowers", tmp_path / "cars"
    out = claim_output(tmp_path / "models" / "flowers", data)
    (out / "features").mkdir()
    assert claim_output(out, data) == out  # an earlier demo of the same data is fine
    with pytest.raises(cnncodes.CnnCodesError, match=f"already holds a demo of {data}"):
        claim_output(out, other)
    assert claim_output(out, data, {"backbone": "vgg16", "image_size": (224, 288)}) == out
    assert claim_output(out, data, {"backbone": "vgg16", "image_size": [224, 288]}) == out
    made = re.escape("made with backbone vgg16, image_size [224, 288], not backbone vgg16, image_size 64")
    with pytest.raises(cnncodes.CnnCodesError, match=made):
        claim_output(out, data, {"backbone": "vgg16", "image_size": 64})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(cnncodes.CnnCodesError, match="files that are not a demo"):
        claim_output(tmp_path / "mine", data)
    mistyped = runner.invoke(app, ["demo", str(tmp_path / "flowerz"), "--out", str(tmp_path / "run")])
    assert mistyped.exit_code == 2 and "does not exist" in mistyped.output
    assert not (tmp_path / "run").exists()  # not claimed for a dataset that is not there
    data = make_dataset(tmp_path / "data", per_class=2)
    inside = runner.invoke(app, ["demo", str(data), "--out", str(data / "run")])
    assert inside.exit_code == 2 and "is inside DATA" in inside.output and not (data / "run").exists()


@pytest.mark.slow
def test_arguments_refused_after_the_split_leave_no_interrupted_run_and_a_features_folder_is_no_out(tuned, tmp_path):
    out = tmp_path / "models"
    args = ["finetune", str(tuned["data"]), "--out", str(out), "--split-from", str(tuned["features"]), *TINY_ARGS]
    refused = runner.invoke(app, [*args, "--unfreeze", "no_such_layer", "-q"])
    assert refused.exit_code == 2 and "no_such_layer" in refused.output
    assert not (out / ".finetune").exists()
    done = runner.invoke(
        app, [*args, "--head-epochs", "1", "--fine-epochs", "0", "-q"]
    )  # neither --resume nor --restart
    assert done.exit_code == 0, done.output

    split = (tuned["features"] / "split.csv").read_bytes()
    into = runner.invoke(app, ["finetune", str(tuned["data"]), "--out", str(tuned["features"]), *TINY_ARGS, "-q"])
    assert into.exit_code == 2 and "is a features folder" in into.output
    assert (tuned["features"] / "split.csv").read_bytes() == split


@pytest.mark.slow
def test_a_second_finetune_of_the_same_run_is_refused_while_one_trains(tuned, tmp_path):
    from filelock import FileLock

    out = tmp_path / "models"
    args = ["finetune", str(tuned["data"]), "--out", str(out), "--split-from", str(tuned["features"]), *TINY_ARGS]
    with FileLock(out / ".finetune" / "vgg16-finetune.lock"):  # as the first run's process holds it
        busy = runner.invoke(app, [*args, "--resume", "-q"])
    assert busy.exit_code == 2 and "another cnncodes finetune is training vgg16-finetune" in busy.output
    done = runner.invoke(app, [*args, "--head-epochs", "1", "--fine-epochs", "0", "-q"])
    assert done.exit_code == 0, done.output
    assert not (out / ".finetune").exists()  # nothing to resume: no lock file, no folder left


@pytest.mark.slow
def test_a_finetune_makes_its_split_as_extract_does_and_a_refused_one_leaves_it_alone(tmp_path):
    data, models = make_dataset(tmp_path / "data", per_class=8), tmp_path / "models"
    write_image(data / "tiny" / "only.png", "circles", seed=4242)
    args = ["finetune", str(data), "--out", str(models), *TINY_ARGS, "--head-epochs", "1", "--fine-epochs", "0", "-q"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "class 'tiny' has only 1 distinct image" in " ".join(first.stderr.split())  # as extract warns
    kept = (models / "split.csv").read_bytes()
    for other in (["--seed", "5"], ["--seed", "5", "--name", "other"]):
        refused = runner.invoke(app, [*args, *other])
        assert refused.exit_code == 2 and "holds the split of this folder's other runs" in refused.stderr
        assert (models / "split.csv").read_bytes() == kept  # --split-from models still gives the runs' split


@pytest.mark.slow
def test_cache_trunk_finds_the_images_of_a_split_made_from_a_csv_beside_the_folder(tmp_path):
    """The split names "../images/a.png" from the CSV's folder; the trunk's codes, "a.png" from DATA's."""
    data = make_dataset(tmp_path / "images", per_class=6)
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "all.csv"
    listing.write_text(
        "path,label\n"
        + "".join(f"../images/{p.relative_to(data)},{p.parent.name}\n" for p in sorted(data.rglob("*.*")))
    )
    cnncodes.extract(listing, tmp_path / "features", fast_spec(), progress=False)
    spec = tiny_spec(cache_trunk=True, fine_epochs=0)
    record = finetune(data, tmp_path / "models", spec, split_from=tmp_path / "features", progress=False)
    split = (tmp_path / "features" / "split.csv").read_text().splitlines()
    assert record["n_test"] == sum(line.endswith(",test") for line in split) > 0


class SeenEagerly(keras.callbacks.Callback):
    """Whether each phase's `fit` ran eagerly."""

    def __init__(self):
        super().__init__()
        self.eagerly: list[bool] = []

    def on_train_begin(self, logs=None):
        self.eagerly.append(bool(self.model.run_eagerly))


@pytest.mark.slow
def test_a_phase_of_a_few_steps_runs_eagerly_and_a_longer_one_is_traced(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)  # 1 or 2 batches of 8 training images per epoch
    seen = SeenEagerly()
    spec = tiny_spec(head_epochs=1, fine_epochs=7, patience=7)
    record = finetune(data, tmp_path / "m", spec, callbacks=[seen], progress=False)
    assert 1 <= record["n_train"] <= 16
    assert seen.eagerly == [True, False]  # at most 2 steps, then at least 7: above EAGER_STEPS
