"""`cnncodes explain` through the CLI and the library: maps, pictures, explain.json, the contact sheet, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnncodes
from cnncodes.core.errors import CnnCodesError
from cnncodes.explain import explain
from cnncodes.explain.maps import FeatureMaps
from cnncodes.nets.weights import Weights
from tests.helpers import cli, fast_spec, make_dataset, write_image

LAYER = "block3_pool"  # a 4x4 map at 32 px: something to locate


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("explain")
    data = make_dataset(root / "data", per_class=8)
    cnncodes.extract(data, root / "features", fast_spec(layer=LAYER), progress=False)
    fitted = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "logreg", "--quiet")
    assert fitted.exit_code == 0, fitted.output
    fitted = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "knn", "--quiet")
    assert fitted.exit_code == 0, fitted.output
    wide = write_image(root / "wide" / "wide.png", "circles", seed=3, size=48)
    Image.open(wide).resize((96, 48)).save(wide)  # not square: the crop leaves parts unseen
    (root / "wide" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return {
        "root": root,
        "data": data,
        "logreg": root / "models" / f"vgg16-{LAYER}-logreg.joblib",
        "knn": root / "models" / f"vgg16-{LAYER}-knn.joblib",
        "wide": root / "wide",
    }


def test_explain_writes_a_map_a_picture_and_an_entry_per_image_agreeing_with_predict(bundles, tmp_path):
    out = tmp_path / "out"
    images = [bundles["data"] / "circles", bundles["wide"]]
    result = cli("explain", bundles["logreg"], *images, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.stderr and "not an image" in result.stderr
    run = json.loads((out / "explain.json").read_text())
    assert run["method"] == "cam" and "intercept" in run["units"] and run["resize"] == "crop"
    entries = {Path(e["filename"]).name: e for e in run["images"]}
    assert entries["broken.jpg"]["error"] and not entries["broken.jpg"]["maps"]
    predicted = json.loads(
        cli("predict", bundles["logreg"], *images, "--format", "json", "--quiet", "--top-k", "1").stdout
    )
    for answer in predicted:
        entry = entries[Path(answer["filename"]).name]
        if answer["error"]:
            continue
        assert entry["label"] == answer["label"] and entry["probability"] == pytest.approx(answer["probability"], 1e-4)
        (shown,) = entry["maps"]
        grid = np.load(out / shown["map"])
        assert grid.shape == (4, 4) and grid.min() == pytest.approx(shown["min"]) and shown["label"] == entry["label"]
        assert Image.open(out / shown["picture"]).size[0] >= 256
    wide = entries["wide.png"]
    assert wide["box"] == [24.0, 0.0, 72.0, 48.0]  # the centred square of a 96x48 image
    picture = np.asarray(Image.open(out / wide["maps"][0]["picture"]).convert("L"), dtype=float)
    original = np.asarray(Image.open(bundles["wide"] / "wide.png").convert("L").resize(picture.shape[::-1]), float)
    edge = picture.shape[1] // 8  # the unseen sides are dimmed, not painted
    assert picture[30:, :edge].mean() < 0.5 * original[30:, :edge].mean()
    sheet = (out / "index.html").read_text()
    assert sheet.count("data:image/png;base64,") == len(predicted) - 1 and "deletion" in sheet
    faith = run["faithfulness"]
    assert set(faith) == {"deletion", "insertion", "random_deletion", "random_insertion"}
    assert all(0 <= v <= 1 for v in faith.values())


def test_explain_writes_nothing_outside_its_folder(bundles, tmp_path):
    before = sorted(p.relative_to(bundles["root"]) for p in bundles["root"].rglob("*"))
    out = tmp_path / "maps"
    result = cli("explain", bundles["logreg"], bundles["data"] / "squares", "--out", out, "--no-faithfulness", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(bundles["root"]) for p in bundles["root"].rglob("*")) == before
    assert {p.suffix for p in out.iterdir()} == {".png", ".npy", ".json", ".html"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_another_class_and_the_top_k_classes(bundles, tmp_path):
    images = bundles["data"] / "stripes"
    result = cli("explain", bundles["logreg"], images, "--out", tmp_path / "a", "--class", "squares", "-q")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "a" / "explain.json").read_text())
    assert {m["label"] for e in run["images"] for m in e["maps"]} == {"squares"}
    result = cli("explain", bundles["logreg"], images, "--out", tmp_path / "b", "--top-k", "2", "--no-faithfulness")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "b" / "explain.json").read_text())
    first = run["images"][0]
    assert [m["map"] for m in first["maps"]] == ["stripes_00.npy", "stripes_00.top2.npy"]
    assert first["maps"][0]["probability"] >= first["maps"][1]["probability"]
    assert first["maps"][0]["label"] != first["maps"][1]["label"]
    assert "faithfulness" not in result.stdout and "index.html" in result.stdout


def test_an_unknown_class_is_one_line_naming_the_known_ones(bundles, tmp_path):
    result = cli("explain", bundles["logreg"], bundles["data"], "--out", tmp_path / "x", "--class", "dogs")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown class 'dogs'" in result.stderr and "'circles'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_k_nearest_neighbours_bundle_is_explained_by_occlusion(bundles, tmp_path):
    run = explain(bundles["knn"], bundles["data"] / "circles", tmp_path / "out", faithfulness=False, progress=False)
    assert run.method == "occlusion" and "probability" in (run.units or "")
    assert all(len(e.maps) == 1 and e.maps[0].intercept == 0 for e in run.images)
    grids = np.stack([np.load(tmp_path / "out" / e.maps[0].map) for e in run.images])
    assert np.abs(grids).max() > 0  # some cell mattered


def test_names_of_images_from_different_folders_do_not_collide(bundles, tmp_path):
    twins = [write_image(tmp_path / f / "same.png", kind, seed=1) for f, kind in (("a", "circles"), ("b", "stripes"))]
    run = explain(bundles["logreg"], twins, tmp_path / "out", faithfulness=False, progress=False)
    assert [e.maps[0].picture for e in run.images] == ["same.png", "same-2.png"]


def test_feature_maps_of_a_layer_are_drawn_beside_the_heat_map(bundles, tmp_path):
    images = sorted((bundles["data"] / "squares").iterdir())[:2]
    result = cli(
        "explain",
        bundles["logreg"],
        *images,
        "--out",
        tmp_path,
        "--no-faithfulness",
        "--feature-maps",
        "block2_pool",
        "-q",
    )
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "explain.json").read_text())
    for entry in run["images"]:
        assert Image.open(tmp_path / entry["feature_maps"]).size[0] > 0


def test_codes_without_a_place_in_the_image_have_no_heat_map():
    for spec in (fast_spec(layer=LAYER, pooling="flatten"), fast_spec(layer="fc1", image_size=224)):
        with pytest.raises(CnnCodesError, match="no heat map"):
            FeatureMaps(spec, Weights("none"))


@pytest.mark.slow
def test_a_fine_tuned_keras_model_is_explained_by_grad_cam(bundles, tmp_path):
    models = tmp_path / "models"
    args = ["--backbone", "smallcnn", "--weights", "none", "--image-size", "16", "--batch-size", "8"]
    tuned = cli("finetune", bundles["data"], "--out", models, *args, "--head-epochs", "1", "--fine-epochs", "0", "-q")
    assert tuned.exit_code == 0, tuned.output
    (model,) = models.glob("*.keras")
    result = cli("explain", model, bundles["data"] / "circles", "--out", tmp_path / "out", "--top-k", "2", "-q")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert run["method"] == "grad-cam" and run["faithfulness"]["deletion"] >= 0
    grid = np.load(tmp_path / "out" / run["images"][0]["maps"][1]["map"])
    assert grid.shape == (12, 12) and grid.min() >= 0  # conv2's map of a 16-px image, ReLU'd


def test_the_compare_report_shows_heat_maps_of_the_chosen_runs_mistakes(bundles, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".joblib", ".json"):  # one run, whose record lists a confident mistake
        (models / bundles["logreg"].with_suffix(suffix).name).write_bytes(
            bundles["logreg"].with_suffix(suffix).read_bytes()
        )
    record_path = models / bundles["logreg"].with_suffix(".json").name
    record = json.loads(record_path.read_text())
    wrong = record["test_predictions"][0]
    wrong["predicted"] = next(c for c in record["classes"] if c != wrong["label"])
    record_path.write_text(json.dumps(record))
    result = cli("compare", models, "--html", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert "href='report-maps/index.html'" in page and "evidence for its wrong answer" in page
    run = json.loads((tmp_path / "report-maps" / "explain.json").read_text())
    mistakes = {Path(p["path"]).name for p in record["test_predictions"] if p["predicted"] != p["label"]}
    assert Path(wrong["path"]).name in mistakes
    assert {Path(e["filename"]).name for e in run["images"]} == mistakes
    assert page.count("data:image/png;base64,") >= len(mistakes)
