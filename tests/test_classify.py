"""`fit-svm`, `compare` and `predict` through the CLI, on codes of small images the tests write."""

from __future__ import annotations

import csv
import importlib
import io
import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app

from .helpers import (
    FLOWERS,
    cli,
    fast_spec,
    make_dataset,
    needs_real_weights,
    runner,
    save_legacy_h5_weights,
    write_image,
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """Codes of 3 classes x 12 images and all four classifiers fitted on them."""
    root = tmp_path_factory.mktemp("classify")
    data = make_dataset(root / "data", per_class=12)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    result = cli("fit-svm", root / "features", "--out", root / "models", "--cv", "3")
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, "features": root / "features", "models": root / "models"}


def records(models: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in models.glob("*.json")}


def test_fit_svm_writes_a_bundle_and_a_run_record_per_classifier(fitted):
    runs = records(fitted["models"])
    assert set(runs) == {f"vgg16-block5_pool-{k}" for k in ("linear-svm", "logreg", "rbf-svm", "knn")}
    meta = json.loads((fitted["features"] / "meta.json").read_text())
    n_test = meta["split"]["counts"]["test"]
    for name, r in runs.items():
        assert (fitted["models"] / f"{name}.joblib").stat().st_size == r["model_bytes"]
        assert r["method"] == "cnn-codes" and r["backbone"] == "vgg16" and r["layer"] == "block5_pool"
        assert r["n_train"] + r["n_test"] == 36 and r["n_test"] == n_test
        assert r["dataset"]["split_fingerprint"] == meta["split"]["fingerprint"]
        assert 0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1
        assert np.array(r["confusion_matrix"]).sum() == n_test
        assert np.trace(np.array(r["confusion_matrix"])) == round(r["accuracy"] * n_test)
        assert sum(c["support"] for c in r["per_class"].values()) == n_test
        assert r["fit_seconds"] > 0 and r["extract_seconds"] == meta["elapsed_seconds"]
        assert len(r["test_predictions"]) == n_test
    assert {r["params"]["normalize"] for r in runs.values()} <= {"standard", "l2", "none"}  # chosen by CV
    assert runs["vgg16-block5_pool-knn"]["params"]["n_neighbors"] in (1, 3, 5, 9, 15, 25)
    assert {"C", "gamma"} <= set(runs["vgg16-block5_pool-rbf-svm"]["params"])


def test_cv_zero_chooses_on_val_and_pca_shrinks_the_codes(fitted):
    out = fitted["root"] / "models_val"
    result = cli(
        "fit-svm",
        fitted["features"],
        "--out",
        out,
        "--classifier",
        "logreg",
        "--cv",
        "0",
        "--pca",
        "8",
        "--normalize",
        "l2",
        "--class-weight",
        "balanced",
        "--name",
        "small",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    record = records(out)["small-vgg16-block5_pool-logreg"]
    assert record["params"]["cv"] == "val" and record["params"]["pca"] == 8
    assert record["params"]["normalize"] == "l2" and record["params"]["class_weight"] == "balanced"
    bundle = joblib.load(out / "small-vgg16-block5_pool-logreg.joblib")
    assert bundle["model"].model_.named_steps["pca"].n_components_ == 8


def test_compare_ranks_by_cv_score_and_marks_the_chosen_run_in_every_format(fitted, tmp_path):
    runs = records(fitted["models"])
    table = runner.invoke(app, ["compare", str(fitted["models"])], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert all(name in table.stdout for name in runs)

    as_json = json.loads(cli("compare", fitted["models"], "--format", "json").stdout)
    cv_scores = [r["cv_score"] for r in as_json]
    assert cv_scores == sorted(cv_scores, reverse=True) and len(as_json) == 4
    assert [r["chosen"] for r in as_json] == [True, False, False, False]
    assert {r["run"] for r in as_json} == set(runs)

    rows = list(csv.DictReader(io.StringIO(cli("compare", fitted["models"], "--format", "csv").stdout)))
    assert [r["run"] for r in rows] == [r["run"] for r in as_json]
    assert rows[0]["accuracy"].startswith(f"{100 * as_json[0]['accuracy']:.1f}%")
    assert rows[0]["p vs chosen"] == "chosen" and rows[0]["select"] == f"{as_json[0]['cv_score']:.3f} cv"

    markdown = cli("compare", fitted["models"], "--format", "markdown", "--output", tmp_path / "t.md")
    assert markdown.exit_code == 0
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0].startswith("| rank | run |") and "| chosen |" in lines[2]
    assert lines[2 + 4] == "" and lines[-1].startswith(f"Chosen: {as_json[0]['run']},") and len(lines) == 2 + 4 + 2

    report = cli("compare", fitted["models"], "--html", tmp_path / "r.html", "--format", "csv")
    assert report.exit_code == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("alt='confusion matrix'") == 4 and page.count("alt='reliability diagram'") == 4
    assert "precision" in page and f"Chosen: {as_json[0]['run']}, the highest selection score" in page
    chosen = as_json[0]
    wrong = [p for p in chosen["test_predictions"] if p["predicted"] != p["label"]]
    # one picture per mistake of the chosen run, up to 12 (its heat map, else a thumbnail), or the sentence
    # saying there are none. Runs tied on CV go to the faster fit, so which run is chosen varies with the machine.
    assert page.count("<figure><img alt='' src='data:image/") == min(len(wrong), 12)
    assert (f"Most confident mistakes of the chosen run, {chosen['run']}</h2><p>None" in page) == (not wrong)


def test_compare_reads_a_folder_given_twice_once_and_tells_copies_apart(fitted, tmp_path):
    twice = json.loads(cli("compare", fitted["models"], f"{fitted['models']}/", "--format", "json").stdout)
    assert len(twice) == 4 and len({r["run"] for r in twice}) == 4
    copy = tmp_path / "copy"
    shutil.copytree(fitted["models"], copy)
    both = json.loads(cli("compare", fitted["models"], copy, "--format", "json").stdout)
    assert len(both) == 8 and len({r["run"] for r in both}) == 8
    assert {r["run"].rsplit("/", 1)[0] for r in both} == {str(fitted["models"]), str(copy)}
    assert cli("compare", copy, "--output", tmp_path / "runs.csv").exit_code == 0  # a file without --format: CSV
    assert len(list(csv.DictReader(io.StringIO((tmp_path / "runs.csv").read_text())))) == 4
    knn = "vgg16-block5_pool-knn"
    for suffix in (".joblib", ".json"):  # a run copied beside itself under another name
        shutil.copy(copy / f"{knn}{suffix}", copy / f"other{suffix}")
    beside = {r["run"] for r in json.loads(cli("compare", copy, "--format", "json").stdout)}
    assert len(beside) == 5 and {f"{copy}/{knn}", f"{copy}/other"} <= beside


def test_compare_passes_over_damaged_records_with_a_warning_naming_each(fitted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fitted["models"], copy)
    cut, thin = copy / "vgg16-block5_pool-knn.json", copy / "vgg16-block5_pool-logreg.json"
    cut.write_text(cut.read_text()[:200])  # a record cut short beside its model
    record = json.loads(thin.read_text())
    del record["balanced_accuracy"]
    thin.write_text(json.dumps(record))
    (copy / "notes.json").write_text("not a run record, and no model beside it")
    edited = copy / "vgg16-block5_pool-rbf-svm.json"
    record = json.loads(edited.read_text())
    edited.write_text(json.dumps(record | {"repeats": "garbage", "fit_seconds": "slow"}))
    result = cli("compare", copy, "--format", "json")
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert len(json.loads(result.stdout)) == 1
    warned = " ".join(result.stderr.split())
    assert f"skipped {cut}: the run record of the model beside it cannot be read" in warned
    assert f"skipped {thin}: the run record lacks balanced_accuracy" in warned
    assert f"skipped {edited}: the run record's fit_seconds is not valid" in warned and "notes.json" not in warned


@pytest.mark.slow
def test_compare_and_predict_never_write_over_a_file_they_read(fitted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fitted["models"], copy)
    record = copy / "vgg16-block5_pool-knn.json"
    kept = record.read_bytes()
    for option in ("-o", "--html"):
        result = cli("compare", copy, option, record)
        assert result.exit_code == 2 and "is one of the files this command reads" in result.stderr
    image = write_image(tmp_path / "x.png")
    for target in (record, record.with_suffix(".joblib")):
        result = cli("predict", record.with_suffix(".joblib"), image, "-o", target)
        assert result.exit_code == 2 and "is one of the files this command reads" in result.stderr
    assert record.read_bytes() == kept and cli("predict", record.with_suffix(".joblib"), image).exit_code == 0
    photo = image.read_bytes()
    for given in (image, image.parent, image.parent / "*.png"):  # `-o photos/*.jpg` expanded by the shell, too
        result = cli("predict", record.with_suffix(".joblib"), given, "-f", "csv", "-o", image)
        assert result.exit_code == 2 and "is one of the files this command reads" in result.stderr
    assert image.read_bytes() == photo


def test_a_class_with_fewer_than_two_training_images_is_named(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    write_image(data / "pair" / "p0.png", "stripes", seed=4000)
    write_image(data / "pair" / "p1.png", "squares", seed=4001)  # one of the two goes to test
    cnncodes.extract(data, tmp_path / "f", fast_spec(), progress=False)
    result = cli("fit-svm", tmp_path / "f", "--out", tmp_path / "m", "--classifier", "logreg", "--quiet")
    assert result.exit_code == 2 and "'pair' (1) has fewer" in " ".join(result.stderr.split())
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("*.joblib"))


def test_compare_refuses_runs_on_different_splits(fitted):
    root = fitted["root"]
    cnncodes.extract(fitted["data"], root / "features_seed1", fast_spec(), progress=False, seed=1)
    fit = cli("fit-svm", root / "features_seed1", "--out", root / "models_seed1", "--classifier", "knn", "--quiet")
    assert fit.exit_code == 0, fit.output
    result = cli("compare", fitted["models"], root / "models_seed1")
    assert result.exit_code == 2 and "different test sets" in result.stderr


def test_predict_reproduces_the_recorded_test_accuracy(fitted):
    model = fitted["models"] / "vgg16-block5_pool-linear-svm.joblib"
    record = json.loads(model.with_suffix(".json").read_text())
    test_images = [str(fitted["data"] / p["path"]) for p in record["test_predictions"]]
    result = cli("predict", model, *test_images, "--format", "json", "--top-k", "2", "--quiet")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["filename"] for a in answers] == test_images
    truth = [p["label"] for p in record["test_predictions"]]
    accuracy = np.mean([a["label"] == t for a, t in zip(answers, truth)])
    assert accuracy == record["accuracy"]
    assert [a["label"] for a in answers] == [p["predicted"] for p in record["test_predictions"]]
    for a in answers:
        assert a["error"] is None and len(a["top_k"]) == 2
        assert a["top_k"][0] == {"label": a["label"], "probability": a["probability"]}
        assert a["top_k"][0]["probability"] >= a["top_k"][1]["probability"]


@pytest.mark.parametrize("views", [["--flip", "--image-size", "32"], ["--image-size", "32,48"]])
@pytest.mark.slow
def test_a_bundle_of_averaged_codes_predicts_its_recorded_test_probabilities(fitted, tmp_path, views):
    options = ["--backbone", "vgg16", "--weights", "none", *views, "--quiet"]
    result = cli("extract", fitted["data"], "--out", tmp_path / "features", *options)
    assert result.exit_code == 0, result.output
    result = cli(
        "fit-svm", tmp_path / "features", "--out", tmp_path / "models", "--classifier", "logreg", "--cv", "3", "--quiet"
    )
    assert result.exit_code == 0, result.output
    model = tmp_path / "models" / "vgg16-block5_pool-logreg.joblib"
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["params"]["views"] == (2 if "32,48" in views else 1)  # trained on the code at each size
    recorded = record["test_predictions"]
    result = cli("predict", model, *[fitted["data"] / p["path"] for p in recorded], "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["label"] for a in answers] == [p["predicted"] for p in recorded]
    np.testing.assert_allclose([a["probability"] for a in answers], [p["probability"] for p in recorded], atol=1e-4)
    if "32,48" in views:  # more training codes than fit in memory with every view: the codes alone
        many = cnncodes.fit_classifiers(
            tmp_path / "features", out=tmp_path / "many", classifiers="logreg", cv=3, max_exact=10, progress=False
        )
        assert many[0]["params"]["views"] == 1


def test_predict_takes_files_folders_and_globs_and_reports_bad_files(fitted, tmp_path):
    model = fitted["models"] / "vgg16-block5_pool-knn.joblib"
    folder = tmp_path / "new"
    write_image(folder / "a.png", "stripes", seed=5000)
    write_image(folder / "deeper" / "b.jpg", "circles", seed=5001)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    single = write_image(tmp_path / "single.png", "squares", seed=5002)
    result = cli(
        "predict",
        model,
        folder,
        single,
        str(tmp_path / "new" / "*.png"),
        tmp_path / "missing.png",
        "--format",
        "json",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    answers = {Path(a["filename"]).name: a for a in json.loads(result.stdout)}
    assert len(json.loads(result.stdout)) == 6  # folder (3) + file + glob (a.png again) + missing
    assert answers["a.png"]["label"] in ("circles", "squares", "stripes")
    assert answers["b.jpg"]["error"] is None and answers["single.png"]["error"] is None
    assert "corrupt" in answers["broken.jpg"]["error"] or "truncated" in answers["broken.jpg"]["error"]
    assert answers["missing.png"]["error"] == "file not found" and answers["missing.png"]["label"] is None

    as_csv = cli("predict", model, single, "--format", "csv", "--output", tmp_path / "p.csv", "--quiet")
    assert as_csv.exit_code == 0
    with open(tmp_path / "p.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["path"] == str(single) and row["label"] in ("circles", "squares", "stripes")

    table = runner.invoke(app, ["predict", str(model), str(single)], env={"COLUMNS": "300"})
    assert table.exit_code == 0 and str(single) in table.stdout

    nothing = cli("predict", model, tmp_path / "missing.png", "--quiet")
    assert nothing.exit_code == 1

    # batches holding only unreadable files: each gets its error, the readable ones their label
    one_by_one = cli("predict", model, folder / "broken.jpg", single, "--batch-size", "1", "--format", "json", "-q")
    assert one_by_one.exit_code == 0, one_by_one.output
    broken, good = json.loads(one_by_one.stdout)
    assert broken["label"] is None and broken["error"] and good["label"] and good["error"] is None
    only_broken = cli("predict", model, folder / "broken.jpg", "--format", "json", "--quiet")
    assert only_broken.exit_code == 1 and json.loads(only_broken.stdout)[0]["error"], only_broken.output


def test_a_recursive_pattern_reads_each_file_once_through_links_to_parent_folders(tmp_path, monkeypatch):
    from cnncodes.serving.predict import expand_inputs

    write_image(tmp_path / "new" / "a.png")
    write_image(tmp_path / "new" / "sub" / "b.png")
    for name in ("up", "again"):  # two links back up: glob's ** would follow them without end
        (tmp_path / "new" / "sub" / name).symlink_to("..", target_is_directory=True)
    found = expand_inputs([str(tmp_path / "new" / "**" / "*.png")])
    assert found == [(str(tmp_path / "new" / "a.png"), None), (str(tmp_path / "new" / "sub" / "b.png"), None)]
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["new/**/b.png", "**/nothing.png"]) == [
        ("new/sub/b.png", None),
        ("**/nothing.png", "no file matches this pattern"),
    ]


def test_predict_refuses_tampered_or_unverifiable_bundles(fitted, tmp_path):
    source = fitted["models"] / "vgg16-block5_pool-logreg.joblib"
    image = write_image(tmp_path / "x.png")

    tampered = tmp_path / "tampered.joblib"
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    shutil.copy(source.with_suffix(".json"), tampered.with_suffix(".json"))
    result = cli("predict", tampered, image)
    assert result.exit_code == 2 and "SHA-256" in result.stderr and "Traceback" not in result.output

    lonely = tmp_path / "lonely.joblib"
    shutil.copy(source, lonely)
    result = cli("predict", lonely, image)
    assert result.exit_code == 2 and "no readable run record" in result.stderr
    lonely.with_suffix(".json").write_text("[]")  # valid JSON, not a record
    result = cli("predict", lonely, image)
    assert result.exit_code == 2 and "is not a cnncodes run record" in result.stderr, result.output

    result = cli("predict", fitted["models"], image)
    assert result.exit_code == 2 and "give a .joblib bundle from fit-svm" in result.stderr, result.output
    result = cli("predict", source.with_suffix(".json"), image)  # the record, given for its model
    assert result.exit_code == 2 and f"give the model beside it, {source}" in " ".join(result.stderr.split())

    old = tmp_path / "old.joblib"
    shutil.copy(source, old)
    record = json.loads(source.with_suffix(".json").read_text())
    record["versions"]["scikit-learn"] = "0.24.2"
    old.with_suffix(".json").write_text(json.dumps(record))
    result = cli("predict", old, image)
    assert result.exit_code == 2 and "scikit-learn 0.24.2" in result.stderr

    renamed = tmp_path / "renamed.keras"  # a bundle under a fine-tuned model's name, with its own record
    shutil.copy(source, renamed)
    shutil.copy(source.with_suffix(".json"), renamed.with_suffix(".json"))
    result = cli("predict", renamed, image)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the .joblib model vgg16-block5_pool-logreg.joblib (method cnn-codes)" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_predict_refuses_a_bundle_whose_weights_file_changed(fitted, tmp_path, vgg16_weights):
    import keras

    weights = Path(shutil.copy(vgg16_weights, tmp_path / "my_vgg16.h5"))
    cnncodes.extract(fitted["data"], tmp_path / "f", fast_spec(weights=str(weights)), progress=False)
    fit = cli("fit-svm", tmp_path / "f", "--out", tmp_path / "m", "--classifier", "knn", "--quiet")
    assert fit.exit_code == 0, fit.output
    model, image = tmp_path / "m" / "vgg16-block5_pool-knn.joblib", write_image(tmp_path / "x.png")
    assert cli("predict", model, image, "--quiet").exit_code == 0

    result = cli("predict", model, image, "--weights", "none", "--quiet")
    assert result.exit_code == 2 and "are not the ones this model was made with" in result.stderr

    keras.utils.set_random_seed(8)
    save_legacy_h5_weights(keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)), weights)
    result = cli("predict", model, image, "--runtime", "keras", "--quiet")  # the cached ONNX model needs no file
    assert result.exit_code == 2 and "are not the ones this model was made with" in result.stderr


@pytest.mark.parametrize("command", ["fit-svm", "compare"])
def test_wrong_or_empty_folders_are_clear_errors(tmp_path, command):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["--out", tmp_path / "m"] if command == "fit-svm" else []
    for folder in (empty, tmp_path / "missing"):
        result = cli(command, folder, *args)
        assert result.exit_code == 2 and result.stderr.startswith("Error:"), result.output


def test_fit_svm_on_damaged_features_is_a_clear_error(fitted, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(fitted["features"], damaged)
    np.save(damaged / "labels.npy", np.zeros(3, dtype=np.int64))
    result = cli("fit-svm", damaged, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "do not belong together" in result.stderr
    np.save(damaged / "labels.npy", np.load(fitted["features"] / "labels.npy").astype(np.float64))
    result = cli("fit-svm", damaged, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "do not belong together" in result.stderr and "Traceback" not in result.output

    shutil.copy(fitted["features"] / "labels.npy", damaged / "labels.npy")
    header, *rows = (damaged / "split.csv").read_text().splitlines()
    test, train = (rows.index(next(r for r in rows if r.endswith(f",{s}"))) for s in ("test", "train"))
    rows[test], rows[train] = rows[test].replace(",test", ",train"), rows[train].replace(",train", ",test")
    (damaged / "split.csv").write_text("\n".join([header, *rows]) + "\n")  # another run's split of the same images
    result = cli("fit-svm", damaged, "--out", tmp_path / "m")
    assert result.exit_code == 2 and "is not the split these codes were made with" in result.stderr


@needs_real_weights
@pytest.mark.slow
def test_linear_svm_on_real_mobilenet_codes_beats_85_percent(tmp_path, monkeypatch):
    data = tmp_path / "flowers"
    for name in ("Bluebell", "Daffodil", "Pansy", "Sunflower"):
        (data / name).mkdir(parents=True)
        for src in sorted((FLOWERS / name).glob("*.jpg"))[:20]:
            shutil.copy(src, data / name / src.name)
    scores = {}
    for weights in ("imagenet", "none"):
        spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", image_size=128, weights=weights)
        cnncodes.extract(data, tmp_path / weights, spec, progress=False)
        fit = cli(
            "fit-svm", tmp_path / weights, "--out", tmp_path / f"m-{weights}", "--classifier", "linear-svm", "--quiet"
        )
        assert fit.exit_code == 0, fit.output
        scores[weights] = records(tmp_path / f"m-{weights}")["mobilenetv2-out_relu-linear-svm"]["accuracy"]
    assert scores["imagenet"] > 0.85, scores
    assert scores["imagenet"] > scores["none"] + 0.15, scores


@pytest.mark.slow
def test_fit_svm_refuses_to_overwrite_runs_made_from_other_codes(fitted):
    root = fitted["root"]
    max_pooled = fast_spec(layer="block3_pool", pooling="max")  # a 4x4 map, cheap to convert
    cnncodes.extract(fitted["data"], root / "features_max", max_pooled, progress=False)
    cnncodes.extract(fitted["data"], root / "features_avg", fast_spec(layer="block3_pool"), progress=False)
    first = cli("fit-svm", root / "features_avg", "--out", root / "shared_out", "--classifier", "knn", "--quiet")
    assert first.exit_code == 0, first.output
    second = cli("fit-svm", root / "features_max", "--out", root / "shared_out", "--classifier", "knn", "--quiet")
    assert second.exit_code == 2 and "--name" in second.stderr
    named = cli(
        "fit-svm",
        root / "features_max",
        "--out",
        root / "shared_out",
        "--classifier",
        "knn",
        "--name",
        "max",
        "--quiet",
    )
    assert named.exit_code == 0 and len(records(root / "shared_out")) == 2


def test_a_record_holds_the_folds_and_components_used_and_says_when_the_data_allowed_fewer(fitted, tmp_path):
    out = tmp_path / "m"
    args = ["fit-svm", fitted["root"] / "features", "--out", out, "--classifier", "logreg", "--pca", "5000"]
    result = cli(*args, "--cv", "100", "--quiet")
    assert result.exit_code == 0, result.output
    params = records(out)["vgg16-block5_pool-logreg"]["params"]
    bundle = joblib.load(out / "vgg16-block5_pool-logreg.joblib")
    assert params["pca"] == bundle["model"].model_.named_steps["pca"].n_components_ < 5000
    assert 2 <= params["cv"] < 100
    warned = " ".join(result.stderr.split())
    assert f"--cv 100: {params['cv']} folds used" in warned and f"--pca 5000: {params['pca']} components" in warned


def test_classifier_needs_two_images_per_class_and_clips_pca_to_the_folds():
    from cnncodes.classify.estimator import CodesClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 100)).astype(np.float32)
    y = np.repeat([0, 1, 2], 20)
    X[y == 1] += 1.0
    model = CodesClassifier(kind="linear-svm", pca=64, cv=5, n_jobs=1).fit(X, y)
    assert model.model_.named_steps["pca"].n_components < 48
    assert model.predict_proba(X).shape == (60, 3)
    with pytest.raises(ValueError, match="at least 2 training images"):
        CodesClassifier(kind="logreg", n_jobs=1).fit(X[:41], y[:41])
    with pytest.raises(ValueError, match="cv takes 2 or more folds"):  # not a quiet 2-fold search
        CodesClassifier(kind="logreg", cv=0, n_jobs=1).fit(X, y)
    with pytest.raises(ValueError, match=r"not among the training labels: \['7'\]"):  # a misspelt class is no-op
        CodesClassifier(kind="logreg", class_weight={7: 5.0}, n_jobs=1).fit(X, y)


@pytest.mark.parametrize("kind", ["linear-svm", "logreg", "rbf-svm"])
def test_hyper_parameter_grids_follow_the_scale_of_the_codes(kind):
    from cnncodes.classify.estimator import CodesClassifier

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 30)
    X = (rng.normal(size=(90, 40)) + 1.5 * rng.normal(size=(3, 40))[y]).astype(np.float32)
    unit = CodesClassifier(kind=kind, normalize="none", cv=3, n_jobs=1).fit(X, y)
    huge = CodesClassifier(kind=kind, normalize="none", cv=3, n_jobs=1).fit(X * 1000, y)
    assert huge.cv_score_ == pytest.approx(unit.cv_score_)
    np.testing.assert_array_equal(huge.predict(X * 1000), unit.predict(X))
    assert huge.best_params_["C"] == pytest.approx(unit.best_params_["C"] / (1e6 if kind != "rbf-svm" else 1))
    l2 = CodesClassifier(kind=kind, normalize="l2", cv=3, n_jobs=1).fit(X, y)
    assert l2.cv_score_ > 0.9


def test_predict_shows_bracketed_file_names_as_they_are(fitted, tmp_path):
    model = fitted["models"] / "vgg16-block5_pool-knn.joblib"
    odd = write_image(tmp_path / "[draft] cat.png", "circles", seed=77)
    table = runner.invoke(app, ["predict", str(model), str(odd)], env={"COLUMNS": "300"})
    assert table.exit_code == 0 and "[draft] cat.png" in table.stdout


def test_compare_names_every_group_of_runs_scored_on_other_test_images(fitted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fitted["models"], copy)
    changed = copy / "vgg16-block5_pool-linear-svm.json"
    record = json.loads(changed.read_text())
    dropped, *record["test_predictions"] = record["test_predictions"]  # edited by hand: one image fewer
    record["n_test"] -= 1
    classes = record["classes"]
    record["confusion_matrix"][classes.index(dropped["label"])][classes.index(dropped["predicted"])] -= 1
    changed.write_text(json.dumps(record))
    result = cli("compare", copy)
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    n = len(record["test_predictions"])
    assert f"vgg16-block5_pool-linear-svm: {n} test images" in message
    assert f"vgg16-block5_pool-knn, vgg16-block5_pool-logreg, vgg16-block5_pool-rbf-svm: {n + 1} test images" in message


def test_the_library_takes_one_image_or_one_folder_as_well_as_a_list(fitted):
    model = fitted["models"] / "vgg16-block5_pool-logreg.joblib"
    image = next(fitted["data"].rglob("*.png"))
    for one in (str(image), image):  # a string is one path, not a sequence of one-letter paths
        (answer,) = cnncodes.predict(model, one, progress=False)
        assert answer.filename == str(image) and answer.label and answer.error is None
    assert len(cnncodes.compare(str(fitted["models"]))) == len(cnncodes.compare([fitted["models"]])) == 4
    for options, words in (({"batch_size": 0}, "^batch_size must be at least 1"), ({"runtime": "foo"}, "runtime")):
        with pytest.raises(cnncodes.CnnCodesError, match=words):
            cnncodes.predict(model, image, progress=False, **options)


def test_library_choices_of_classifier_and_out_folder_are_checked_before_fitting(fitted, tmp_path):
    with pytest.raises(cnncodes.CnnCodesError, match="no classifier given"):
        cnncodes.fit_classifiers(fitted["features"], out=tmp_path / "m", classifiers=[], progress=False)
    (record,) = cnncodes.fit_classifiers(
        fitted["features"], out=tmp_path / "m", classifiers="knn", cv=3, progress=False
    )
    assert record["classifier"] == "knn"  # one kind by name, not a kind per letter
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    result = cli("fit-svm", fitted["features"], "--out", a_file, "--classifier", "knn", "--quiet")
    assert result.exit_code == 2 and f"{a_file} cannot be made a folder: a file is in the way" in result.stderr
    result = cli("compare", fitted["models"], "--html", a_file / "report.html")
    assert result.exit_code == 2 and f"{a_file} cannot be made a folder" in result.stderr


def test_ctrl_c_names_the_runs_already_saved(fitted, tmp_path, monkeypatch):
    classifiers = importlib.import_module("cnncodes.classify.estimator")
    fit = classifiers.CodesClassifier.fit

    def interrupted_at_knn(self, *args, **kwargs):
        if self.kind == "knn":
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(classifiers.CodesClassifier, "fit", interrupted_at_knn)
    out = tmp_path / "models"
    result = cli(
        "fit-svm", fitted["features"], "--out", out, "--classifier", "logreg", "--classifier", "knn", "--cv", "3"
    )
    assert result.exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == [
        ".fit-svm.lock",
        "vgg16-block5_pool-logreg.joblib",
        "vgg16-block5_pool-logreg.json",
    ]
    assert f"Interrupted: vgg16-block5_pool-logreg saved in {out}; the others were not fitted." in " ".join(
        result.output.split()
    )


@pytest.mark.slow
def test_models_fitted_after_images_and_weights_moved_know_their_new_places(tmp_path, vgg16_weights):
    (tmp_path / "w").mkdir()
    weights = Path(shutil.copy(vgg16_weights, tmp_path / "w" / "my.h5"))
    data = make_dataset(tmp_path / "data", per_class=6)
    cnncodes.extract(data, tmp_path / "f", fast_spec(weights=str(weights)), progress=False)
    data, weights = data.rename(tmp_path / "images"), weights.rename(tmp_path / "my.h5")  # moved, not changed
    again = cnncodes.extract(data, tmp_path / "f", fast_spec(weights=str(weights)), progress=False)
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    assert again.up_to_date and (meta["data"], meta["extractor"]["weights_file"]) == (str(data), str(weights))
    assert cli("fit-svm", tmp_path / "f", "--out", tmp_path / "m", "--classifier", "knn", "--quiet").exit_code == 0
    model, image = tmp_path / "m" / "vgg16-block5_pool-knn.joblib", next(data.glob("*/*.png"))
    assert cli("predict", model, image, "--quiet").exit_code == 0  # finds the weights where they are now
    weights = weights.rename(tmp_path / "elsewhere.h5")
    lost = cli("predict", model, image, "--runtime", "keras", "--quiet")  # the cached ONNX model needs no file
    assert lost.exit_code == 2 and "which is not there any more: give its new place with --weights PATH" in " ".join(
        lost.stderr.split()
    )
    assert cli("predict", model, image, "--weights", weights, "--quiet").exit_code == 0


def test_an_unwritable_onnx_cache_falls_back_to_keras_and_says_what_to_set(fitted, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(not_a_folder))
    model = fitted["models"] / "vgg16-block5_pool-logreg.joblib"
    result = cli("predict", model, next(fitted["data"].glob("*/*.png")), "--quiet")
    assert result.exit_code == 0, result.output
    assert f"the ONNX cache {not_a_folder} cannot be written" in " ".join(result.stderr.split())
    assert "set CNNCODES_CACHE_DIR to a writable folder" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_a_link_to_a_bundle_finds_the_record_beside_the_bundle(fitted, tmp_path):
    link = tmp_path / "links" / "model.joblib"
    link.parent.mkdir()
    link.symlink_to(fitted["models"] / "vgg16-block5_pool-logreg.joblib")
    result = cli("predict", link, next(fitted["data"].glob("*/*.png")), "--quiet")
    assert result.exit_code == 0, result.output


def test_the_report_says_when_the_mistakes_images_are_gone(fitted, tmp_path):
    moved = tmp_path / "models"
    shutil.copytree(fitted["models"], moved)
    for record_path in moved.glob("*.json"):  # as if the images had moved since the runs were fitted
        record = json.loads(record_path.read_text())
        record["dataset"]["data"] = str(tmp_path / "gone")
        first = record["test_predictions"][0]  # and one mistake to show, in every run
        first["predicted"] = next(c for c in record["classes"] if c != first["label"])
        record_path.write_text(json.dumps(record))
    report = cli("compare", moved, "--html", tmp_path / "r.html")
    assert report.exit_code == 0 and f"cannot be read in {tmp_path / 'gone'} (moved?)" in " ".join(
        report.stderr.split()
    )
    assert "data:image/jpeg;base64," not in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("kind", ["linear-svm", "logreg"])
def test_training_on_views_teaches_what_the_class_does_not_depend_on(kind):
    from cnncodes.classify.estimator import CodesClassifier

    # x tells the classes apart; y happens to as well in the training codes, but each image's views
    # (its code at other scales, say) spread far along y: a model of the views learns to ignore y
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 15)
    sign = np.where(y == 1, 1.0, -1.0)
    X = np.stack([0.3 * sign, sign], axis=1) + rng.normal(scale=0.03, size=(30, 2))
    views = X[:, None, :] + np.array([[0.0, -10.0], [0.0, 10.0]])
    later = np.array([[-0.3, 1.5], [0.3, -1.5]])  # y the other way round
    codes_only = CodesClassifier(kind=kind, normalize="standard", cv=3, n_jobs=1).fit(X, y)
    on_views = CodesClassifier(kind=kind, normalize="standard", cv=3, n_jobs=1).fit(X, y, views=views)
    assert (codes_only.n_views_, on_views.n_views_) == (1, 2)
    assert list(codes_only.predict(later)) == [1, 0]
    assert list(on_views.predict(later)) == [0, 1]
    assert on_views.cv_score_ == 1.0  # scored on the held-out images' codes, not on their views


@pytest.mark.parametrize("kind", ["linear-svm", "rbf-svm", "knn"])
def test_views_equal_to_the_codes_fit_the_model_the_codes_alone_fit(kind):
    from cnncodes.classify.estimator import CodesClassifier

    rng = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 12)
    centres = 1.2 * rng.normal(size=(3, 8))
    X = (rng.normal(size=(36, 8)) + centres[y]).astype(np.float32)
    alone = CodesClassifier(kind=kind, cv=3, n_jobs=1).fit(X, y)
    repeated = CodesClassifier(kind=kind, cv=3, n_jobs=1).fit(X, y, views=np.repeat(X[:, None], 3, axis=1))
    per_view = {"C": 1 / 3, "n_neighbors": 3}  # C is per view; k counts the views of k images
    per_image = {k: v / per_view.get(k, 1) for k, v in repeated.best_params_.items() if k != "normalize"}
    assert per_image == pytest.approx({k: v for k, v in alone.best_params_.items() if k != "normalize"})
    assert repeated.best_params_["normalize"] == alone.best_params_["normalize"]
    assert repeated.cv_score_ == pytest.approx(alone.cv_score_)
    later = (rng.normal(size=(21, 8)) + centres[np.arange(21) % 3]).astype(np.float32)  # images not fitted
    np.testing.assert_array_equal(repeated.predict(later), alone.predict(later))
    # k-NN's votes are the same; libsvm stops within its tolerance of the same solution
    tolerance = 1e-9 if kind == "knn" else 0.05
    np.testing.assert_allclose(repeated.predict_proba(later), alone.predict_proba(later), atol=tolerance)
    with pytest.raises(ValueError, match=r"views must be \(rows, views, 8\)"):
        CodesClassifier(kind=kind, cv=3, n_jobs=1).fit(X, y, views=X[:, None, :4])
