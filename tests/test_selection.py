"""The run chosen for use is chosen on CV or validation, never on the test images; the demo runs the commands."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.finetuning.spec import make_spec, spec_params
from cnncodes.runs.evaluate import wilson_ci
from cnncodes.runs.records import build_record, publish_run

from .helpers import SAVED_RECORD, cli, fast_spec, make_dataset, needs_real_weights, record_fields, runner

IMAGES = SAVED_RECORD.parents[1] / "images"  # the saved record's test images


def publish(folder: Path, run: str, right: list[bool], **fields) -> None:
    """A run record (and a stand-in model) right on the saved record's test images where `right` says."""
    made = record_fields()
    predictions = [
        p | {"predicted": p["label"] if ok else next(c for c in made["classes"] if c != p["label"])}
        for p, ok in zip(made["test_predictions"], right, strict=True)
    ]
    record = record_fields(
        run=run,
        test_predictions=predictions,
        accuracy=float(np.mean(right)),
        accuracy_ci95=list(wilson_ci(sum(right), len(right))),
        dataset=made["dataset"] | {"data": str(IMAGES)},
        **fields,
    )
    publish_run(folder / f"{run}.joblib", lambda tmp: tmp.write_bytes(b"model"), build_record(**record))


def test_a_run_ahead_on_the_test_images_but_behind_on_cv_is_not_chosen_in_any_format(tmp_path):
    tuned = {"method": "finetune", "classifier": "dense head", "params": {}, "cv_score": None, "grid_edges": None}
    publish(tmp_path, "steady", [True, True, True, False, False], cv_score=0.95, fit_seconds=2.0)
    publish(tmp_path, "steady-slow", [True] * 5, cv_score=0.95, fit_seconds=3.0)  # a tie goes to the cheaper fit
    publish(tmp_path, "lucky", [True] * 5, cv_score=0.80, fit_seconds=1.0)
    publish(tmp_path, "tuned", [True, True, True, True, False], **tuned, val_score=0.9)
    publish(tmp_path, "older", [True] * 5, **tuned, fit_seconds=0.5)  # a fine-tune recorded before val_score

    listed = json.loads(cli("compare", tmp_path, "--format", "json").stdout)
    assert [r["run"] for r in listed] == ["steady", "steady-slow", "tuned", "lucky", "older"]
    assert [r["chosen"] for r in listed] == [True, False, False, False, False]
    assert [r["selected_on"] for r in listed] == ["cv", "cv", "val", "cv", None]
    assert listed[0]["p_vs_chosen"] is None
    # two-sided McNemar on the 5 test images: steady-slow is right on the 2 that steady gets wrong
    assert listed[1]["p_vs_chosen"] == pytest.approx(0.5) and listed[1]["p_vs_chosen_test"] == "McNemar"

    table = runner.invoke(app, ["compare", str(tmp_path)], env={"COLUMNS": "200"})
    lines = {line.split()[1]: line for line in table.stdout.splitlines() if line.split()[:1] in (["1"], ["3"], ["4"])}
    assert "0.950 cv" in lines["steady"] and " chosen " in lines["steady"] and "60.0%" in lines["steady"]
    assert "0.900 val" in lines["tuned"] and "100.0%" in lines["lucky"] and "chosen" not in lines["lucky"]
    said = " ".join(table.stdout.split())
    assert "Chosen: steady, the highest selection score (CV score 0.950; ties go to the faster fit" in said
    assert "No CV score for tuned: ranked on the validation accuracy of the weights early stopping kept" in said
    assert "Ranked last, without a CV or validation score (recorded by an older version): older;" in said
    assert "select: cv = CV score, val = validation accuracy" in said

    rows = list(csv.DictReader(io.StringIO(cli("compare", tmp_path, "--format", "csv").stdout)))
    assert [(r["run"], r["select"], r["p vs chosen"]) for r in rows[:3]] == [
        ("steady", "0.950 cv", "chosen"),
        ("steady-slow", "0.950 cv", "0.5"),
        ("tuned", "0.900 val", "1"),
    ]
    assert rows[4]["select"] == "-"
    markdown = cli("compare", tmp_path, "--format", "markdown").stdout.splitlines()
    assert markdown[2].startswith("| 1 | steady |") and "| chosen |" in markdown[2]
    assert markdown[-1].startswith("Chosen: steady,")

    assert cli("compare", tmp_path, "--html", tmp_path / "report.html", "--format", "csv").exit_code == 0
    page = (tmp_path / "report.html").read_text()
    assert "<h2>steady (chosen)</h2>" in page and "<h2>lucky</h2>" in page
    assert "Most confident mistakes of the chosen run, steady</h2>" in page
    wrong = [p["path"] for p in record_fields()["test_predictions"][3:]]
    assert all(path in page for path in wrong) and page.count("data:image/jpeg;base64,") == 2


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("selection")
    data = make_dataset(root / "data", per_class=10)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    return {"data": data, "features": root / "features"}


def test_fit_svm_names_the_run_chosen_on_cv(features, tmp_path):
    result = runner.invoke(
        app, ["fit-svm", str(features["features"]), "--out", str(tmp_path), "--cv", "2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    chosen = min(records, key=lambda r: (-r["cv_score"], r["fit_seconds"], r["run"]))
    said = " ".join(result.stdout.split())
    assert f"Chosen: {chosen['run']}, the highest selection score (CV score {chosen['cv_score']:.3f};" in said
    line = next(line for line in result.stdout.splitlines() if chosen["run"] in line.split())
    assert "chosen" in line.split()


@pytest.mark.slow
def test_a_fine_tune_records_the_validation_accuracy_of_the_weights_it_keeps_and_says_where_it_saved_them(
    features, tmp_path
):
    args = ["finetune", str(features["data"]), "--split-from", str(features["features"]), "--out", str(tmp_path)]
    args += [
        "--backbone",
        "vgg16",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--head-epochs",
        "3",
        "--fine-epochs",
        "2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "vgg16-finetune.json").read_text())
    with (features["features"] / "split.csv").open() as f:
        val = [row for row in csv.DictReader(f) if row["subset"] == "val"]
    answers = cnncodes.predict(
        tmp_path / "vgg16-finetune.keras", [features["data"] / r["path"] for r in val], runtime="keras", progress=False
    )
    kept = np.mean([a.label == r["label"] for a, r in zip(answers, val)])
    assert record["val_score"] == pytest.approx(kept, abs=1e-6)
    saved = f"vgg16-finetune (validation accuracy {kept:.3f}) -> {tmp_path / 'vgg16-finetune.keras'}"
    assert saved in " ".join(result.stdout.split())


@needs_real_weights
@pytest.mark.slow
def test_the_demo_runs_the_commands_defaults_and_says_each_difference_split_and_file(demo_run):
    out, said = demo_run["out"], " ".join(demo_run["output"].split())
    assert "Warning: skipped 1 file(s)" in said and str(out / "features" / "rejected.csv") in said

    with (out / "features" / "split.csv").open() as f:
        subsets = [row["subset"] for row in csv.DictReader(f)]
    counts = ", ".join(f"{subsets.count(s)} {s}" for s in ("train", "val", "test"))
    assert f"split: {counts} images" in said and "{'train'" not in said

    default_sizes = ",".join(map(str, ExtractorSpec.create().scales or [ExtractorSpec.create().image_size]))
    differences = re.findall(r"not the default: (--[a-z-]+)", said)
    assert differences == ["--image-size", "--image-size", "--no-augment", "--cache-trunk"]  # extract's, finetune's
    assert f"--image-size 32 (default {default_sizes}): as --image-size asks" in said
    assert f"--image-size 32 (default {make_spec().image_size}): as --image-size asks" in said
    assert "--cache-trunk (default off)" in said and "--no-augment (default on)" in said

    listed = json.loads(cli("compare", out, "--format", "json").stdout)
    tuned = next(r for r in listed if r["method"] == "finetune")
    differ = {"image_size", "cache_trunk", "augment", "trainable_weights"}
    assert {k: v for k, v in tuned["params"].items() if k not in differ} == {
        k: v for k, v in spec_params(make_spec()).items() if k not in differ
    }  # epochs, learning rates, patience: finetune's defaults
    for record in listed:  # every artifact named as it is written
        assert f"{record['run']} (" in said and str(out / record["model_file"]) in said
    assert str(out / "features") in said and str(out / "report.html") in said
    assert f"predict: the chosen run ({listed[0]['run']})" in said and listed[0]["chosen"]
    converted = re.findall(r"Converting (\S+) for ONNX Runtime", said)  # none when the run's cache holds them
    assert len(converted) == len(set(converted)) and all(f"Extracting {name} " in said for name in converted)


def test_a_demo_with_an_image_size_the_backbone_refuses_claims_no_folder(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2)
    refused = cli("demo", data, "--out", tmp_path / "demo", "--backbone", "vgg16", "--image-size", "16")
    assert refused.exit_code == 2 and "vgg16 needs images of at least 32 px" in refused.output
    assert not (tmp_path / "demo").exists()
