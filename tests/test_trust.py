"""Numbers users can trust: probabilities, repeated splits, significance, intervals, and the 80-column table."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import cnncodes
from cnncodes.classify.estimator import CodesClassifier
from cnncodes.codes.features import load_features
from cnncodes.core.choices import KINDS
from cnncodes.core.files import sha256_file
from cnncodes.data.split import assign_subsets
from cnncodes.runs.evaluate import calibration, mcnemar_p, paired_p, score, wilson_ci
from cnncodes.runs.records import load_records, repeat_score, repeats_summary
from cnncodes.runs.report import explain, rank, rich_table, rows

from .helpers import cli, fast_spec, make_dataset


@pytest.mark.parametrize("kind", KINDS)
def test_points_on_the_class_boundary_get_lower_top1_probabilities_than_far_ones(kind):
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [6.0, 0.0], [3.0, 5.0]])
    y = np.repeat([0, 1, 2], 40)
    X = np.hstack([centres[y] + rng.normal(scale=1.2, size=(120, 2)), rng.normal(size=(120, 4))])
    model = CodesClassifier(kind=kind, cv=3, n_jobs=1).fit(X, y)
    far = np.hstack([centres, np.zeros((3, 4))])
    boundary = np.hstack([(centres + np.roll(centres, 1, axis=0)) / 2, np.zeros((3, 4))])  # midpoints of two classes
    top_far, top_boundary = model.predict_proba(far).max(axis=1), model.predict_proba(boundary).max(axis=1)
    assert top_boundary.max() < top_far.min(), (top_boundary, top_far)
    assert top_far.min() > 0.8
    np.testing.assert_array_equal(model.predict(far), [0, 1, 2])
    # the label is the model's decision, and always the top probability
    np.testing.assert_array_equal(model.predict(X), model.classes_[model.model_.predict(X)])
    np.testing.assert_array_equal(model.predict(X), model.predict_proba(X).argmax(axis=1))


@pytest.mark.parametrize("kind", KINDS)
def test_an_images_probabilities_do_not_depend_on_the_batch_it_comes_in(kind):
    # l2-normalised codes of close classes give logistic regression small logits, and so a small
    # temperature that magnified float32 rounding (which differs between one row and many) into
    # the 5th decimal of the probabilities
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 30)
    X = (np.eye(3)[y] @ rng.uniform(0, 0.1, size=(3, 64)) + rng.uniform(0, 3, size=(90, 64))).astype(np.float32)
    model = CodesClassifier(kind=kind, normalize="l2", cv=3, n_jobs=1).fit(X, y)
    batch = model.predict_proba(X)
    alone = np.vstack([model.predict_proba(X[i : i + 1]) for i in range(len(X))])
    # k-NN's brute-force distances (a matrix product) differ by ~1e-8: far below the 6 decimals shown
    np.testing.assert_allclose(alone, batch, rtol=0, atol=1e-7 if kind == "knn" else 1e-12)


def test_svm_probabilities_couple_pairwise_ones_and_survive_a_fold_without_a_class():
    from scipy.special import logit

    from cnncodes.classify.calibration import coupled_probabilities

    p = np.array([0.6, 0.3, 0.0999, 0.0001])
    first, second = np.triu_indices(4, 1)
    margins = 2.0 * logit(p[first] / (p[first] + p[second]))  # i beats j with p_i / (p_i + p_j), at temperature 2
    np.testing.assert_allclose(coupled_probabilities(margins[None], 2.0)[0], p, atol=1e-9)
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], [30, 30, 4])
    X = rng.normal(size=(64, 5)) + 3 * np.eye(5)[y]
    groups = np.where(y == 2, -1, np.arange(64))  # one duplicate group: a calibration fold never sees class 2
    for kind in ("linear-svm", "rbf-svm"):
        model = CodesClassifier(kind=kind, cv=2, n_jobs=1).fit(X, y, groups=groups)
        proba = model.predict_proba(X)
        assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1) and model.temperature_ > 0
        np.testing.assert_array_equal(model.predict(X), proba.argmax(axis=1))
        binary = CodesClassifier(kind=kind, cv=3, n_jobs=1).fit(X[y < 2], y[y < 2])
        np.testing.assert_array_equal(binary.predict(X[y < 2]), binary.predict_proba(X[y < 2]).argmax(axis=1))
        assert (binary.predict(X[y < 2]) == y[y < 2]).mean() > 0.9


def test_calibration_scores_match_a_hand_computation():
    y = np.array([0, 1, 1, 0])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]])
    scores = calibration(y, proba)
    # top-1 probabilities 0.9 0.6 0.8 0.7, right right wrong wrong, each alone in one of 15 bins
    assert scores["ece"] == pytest.approx((0.1 + 0.4 + 0.8 + 0.7) / 4)
    assert scores["brier"] == pytest.approx((0.02 + 0.32 + 1.28 + 0.98) / 4)
    assert scores["log_loss"] == pytest.approx(-(math.log(0.9) + math.log(0.6) + math.log(0.2) + math.log(0.3)) / 4)
    assert scores["confidence_auroc"] == pytest.approx(0.5)  # 0.9 beats both wrong ones, 0.6 neither
    assert scores["confidence_right"] == pytest.approx(0.75) and scores["confidence_wrong"] == pytest.approx(0.75)
    assert calibration(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))["confidence_auroc"] is None


def test_a_class_without_test_images_is_left_out_of_macro_f1_as_of_balanced_accuracy():
    """All of a class's images can be duplicates kept in train: it then has nothing to score."""
    y_true = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])
    scores = score(y_true, proba, ["a", "b", "absent"])
    # a: precision 1, recall 1/2, F1 2/3; b: precision 2/3, recall 1, F1 4/5; "absent": none
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores["balanced_accuracy"] == pytest.approx(0.75) and scores["per_class"]["absent"]["support"] == 0


def test_the_interval_is_wilsons_and_never_zero_width():
    low, high = wilson_ci(20, 20)
    assert high == pytest.approx(1.0) and low == pytest.approx(20 / (20 + 1.959964**2), abs=1e-4)
    low, high = wilson_ci(97, 100)
    assert (round(low, 4), round(high, 4)) == (0.9155, 0.9897)


def test_mcnemar_matches_a_hand_computation_and_identical_runs_get_p_1():
    a = np.array([True] * 10 + [False] * 2)
    b = np.array([True] * 2 + [False] * 8 + [True] * 2)
    # 8 images only a gets right, 2 only b: p = 2 · P(Binomial(10, 1/2) ≤ 2) = 2 · 56 / 1024
    assert mcnemar_p(a, b) == pytest.approx(112 / 1024)
    assert mcnemar_p(a, a) == 1.0
    # one-sided: that b is worse than a is P(Binomial(10, 1/2) >= 8) = 56 / 1024; that a is worse, near 1
    assert mcnemar_p(b, a, "less") == pytest.approx(56 / 1024)
    assert mcnemar_p(a, b, "less") == pytest.approx(1 - 11 / 1024)
    assert paired_p([0.9, 0.8, 0.85], [0.9, 0.8, 0.85]) == 1.0
    assert paired_p([0.9, 0.8, 0.85, 0.9], [0.8, 0.75, 0.8, 0.82]) < 0.05


def fake_record(run: str, right: list[bool], repeats: list[float] | None = None, cv: float | None = 0.9) -> dict:
    predictions = [
        {"path": f"{i}.png", "label": "a", "predicted": "a" if r else "b", "probability": 0.9}
        for i, r in enumerate(right)
    ]
    record = {
        "run": run,
        "method": "cnn-codes",
        "dataset": {"split_fingerprint": "f"},
        "accuracy": float(np.mean(right)),
        "balanced_accuracy": float(np.mean(right)),
        "fit_seconds": 1.0,
        "cv_score": cv,
        "test_predictions": predictions,
    }
    if repeats:
        record |= {
            "repeats": [{"seed": s, "accuracy": a, "n_test": 10} for s, a in enumerate(repeats)],
            "accuracy_mean": float(np.mean(repeats)),
            "accuracy_sd": float(np.std(repeats, ddof=1)),
        }
    return record


def test_compare_chooses_on_cv_and_tests_every_runs_test_accuracy_against_the_chosen_one():
    chosen = fake_record("chosen", [True] * 18 + [False] * 12, cv=0.96)
    twin = fake_record("twin", [True] * 18 + [False] * 12, cv=0.96) | {"fit_seconds": 2.0}  # as good, slower
    lucky = fake_record("lucky", [True] * 30, cv=0.9)  # ahead on the test images, behind on CV
    ranked = rank([lucky, twin, chosen])
    assert [r["run"] for r in ranked] == ["chosen", "twin", "lucky"]
    assert [r["chosen"] for r in ranked] == [True, False, False]
    assert ranked[0]["p_vs_chosen"] is None and ranked[1]["p_vs_chosen"] == 1.0
    # two-sided: lucky is right on 12 images the chosen run gets wrong, and never the other way
    assert ranked[2]["p_vs_chosen"] == pytest.approx(2 * 0.5**12) and ranked[2]["p_vs_chosen_test"] == "McNemar"
    shown = {"backbone": "b", "layer": "l", "macro_f1": 0.8, "model_bytes": 1000, "accuracy_ci95": [0.5, 0.9]}
    by_run = {row["run"]: row for row in rows([r | shown for r in ranked])}
    assert [by_run[run]["p vs chosen"] for run in ("chosen", "twin", "lucky")] == ["chosen", "1", "0.00049 *"]
    assert by_run["lucky"]["select"] == "0.900 cv"
    said = explain(ranked)
    assert said.startswith("Chosen: chosen, the highest selection score (CV score 0.960")
    assert "the test accuracy of lucky differs from the chosen run's (marked *)" in said

    # with repeats on the same splits: a paired t-test over the per-split scores
    steady = fake_record("steady", [True] * 20 + [False] * 10, repeats=[0.9, 0.92, 0.91, 0.93], cv=0.95)
    better = fake_record("better", [True] * 30, repeats=[0.97, 0.99, 0.98, 0.99], cv=0.94)
    ranked = rank([better, steady])
    assert [r["run"] for r in ranked] == ["steady", "better"]
    assert ranked[1]["p_vs_chosen_test"] == "paired t" and ranked[1]["p_vs_chosen"] < 0.05

    # fit-svm --cv 0 chose on the val subset; a fine-tune has its validation accuracy; an old record neither
    on_val = fake_record("on-val", [True] * 20, cv=0.8) | {"params": {"cv": "val"}}
    tuned = fake_record("tuned", [True] * 20, cv=None) | {"method": "finetune", "val_score": 0.85}
    old = fake_record("old", [True] * 20, cv=None) | {"method": "finetune", "fit_seconds": 0.1}
    ranked = rank([old, on_val, tuned])
    assert [(r["run"], r["selected_on"]) for r in ranked] == [("tuned", "val"), ("on-val", "val"), ("old", None)]
    said = explain(ranked)
    assert "validation accuracy 0.850" in said and "No CV score for tuned: ranked on the validation accuracy" in said
    assert "Ranked last, without a CV or validation score (recorded by an older version): old;" in said
    assert "no other run's test accuracy differs significantly" in said
    assert explain(rank([old])).startswith("Listed first: old; no run has a CV or validation score")


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> dict[str, Path]:
    """Codes of 3 classes x 10 images, with pairs of images marked as duplicates in groups.npy."""
    root = tmp_path_factory.mktemp("trust")
    data = make_dataset(root / "data", per_class=10)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    made = load_features(root / "features")
    # pairs of images of one class in one subset of extract's split, as its duplicate groups would be
    order = np.argsort([f"{subset}/{path}" for subset, path in zip(made.subsets, made.paths)], kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    groups[order] = np.arange(len(order)) // 2
    same = [len({made.subsets[i] for i in np.nonzero(groups == g)[0]}) == 1 for g in np.unique(groups)]
    alone = -1 - np.arange(len(order))  # a pair split by extract's subsets becomes two groups
    groups_file = root / "features" / "groups.npy"
    np.save(groups_file, np.where(np.isin(groups, np.unique(groups)[same]), groups, alone))
    meta = json.loads((root / "features" / "meta.json").read_text())  # recorded as extract would have
    meta.setdefault("files", {})["groups.npy"] = {
        "bytes": groups_file.stat().st_size,
        "sha256": sha256_file(groups_file),
    }
    (root / "features" / "meta.json").write_text(json.dumps(meta))
    return {"root": root, "data": data, "features": root / "features"}


def test_repeated_splits_are_distinct_deterministic_and_keep_duplicates_together(codes):
    feats = load_features(codes["features"])
    splits = feats.repeated_splits(4)
    assert [seed for seed, _ in splits] == [0, 1, 2, 3]
    np.testing.assert_array_equal(splits[0][1], feats.subsets)  # the first is the features' own split
    assert len({tuple(subsets) for _, subsets in splits}) == 4
    again = load_features(codes["features"]).repeated_splits(4)
    assert all((a == b).all() for (_, a), (_, b) in zip(splits, again))
    for _, subsets in splits:
        for group in np.unique(feats.groups):
            assert len(set(subsets[feats.groups == group])) == 1
        fitted_groups = set(feats.groups[subsets != "test"])
        assert not fitted_groups & set(feats.groups[subsets == "test"])  # no copy of a test image is fitted
        assert set(subsets) == {"train", "val", "test"}
    labels = [feats.classes[i] for i in feats.y]
    assert assign_subsets(feats.paths, labels, feats.groups, (0.7, 0.15, 0.15), 2).subsets == list(splits[2][1])


def test_fit_svm_repeats_scores_each_split_on_its_own_test_images(codes, tmp_path):
    result = cli(
        "fit-svm",
        codes["features"],
        "--out",
        tmp_path,
        "--classifier",
        "knn",
        "--classifier",
        "linear-svm",
        "--cv",
        "2",
        "--repeats",
        "3",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    feats = load_features(codes["features"])
    splits = feats.repeated_splits(3)
    for path in tmp_path.glob("*.json"):
        record = json.loads(path.read_text())
        assert [r["seed"] for r in record["repeats"]] == [0, 1, 2]
        assert [r["n_test"] for r in record["repeats"]] == [int((s == "test").sum()) for _, s in splits]
        assert record["repeats"][0]["accuracy"] == record["accuracy"]  # the bundle and record are the first split's
        accuracies = [r["accuracy"] for r in record["repeats"]]
        assert record["accuracy_mean"] == pytest.approx(np.mean(accuracies))
        assert record["accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
        first = record["repeats"][0]
        assert (first["ece"], first["confidence_auroc"]) == (record["ece"], record["confidence_auroc"])
        assert record["ece_mean"] == pytest.approx(np.mean([r["ece"] for r in record["repeats"]]))
        for key in ("log_loss", "brier", "ece"):
            assert record[key] >= 0
    as_json = json.loads(cli("compare", tmp_path, "--format", "json").stdout)
    assert as_json[0]["chosen"] and as_json[0]["cv_score"] >= as_json[1]["cv_score"]
    assert as_json[1]["p_vs_chosen_test"] == "paired t" and 0 <= as_json[1]["p_vs_chosen"] <= 1


def test_repeated_calibration_is_averaged_over_the_splits_that_have_it():
    y = np.array([0, 1, 0, 1])
    all_right = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    one_wrong = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    summary = repeats_summary([repeat_score(0, y, all_right), repeat_score(1, y, one_wrong)])
    assert summary["repeats"][0]["confidence_auroc"] is None  # no wrong prediction to rank
    assert summary["confidence_auroc_mean"] == 1.0  # the wrong one (0.6) is below every right one
    # one image per bin: ECE is the mean |confidence - right|, 0.25 and 0.3
    assert summary["ece_mean"] == pytest.approx(0.275)
    assert summary["confidence_wrong_mean"] == pytest.approx(0.6)
    assert summary["confidence_right_mean"] == pytest.approx((0.75 + 0.8) / 2)
    older = {"seed": 2, "accuracy": 0.5, "n_test": 4}  # a split scored before splits kept their calibration
    summary = repeats_summary([repeat_score(0, y, all_right), older])
    assert summary["ece_mean"] is None and summary["accuracy_mean"] == pytest.approx(0.75)


def test_compare_shows_the_calibration_means_of_repeated_splits():
    shown = {"backbone": "b", "layer": "l", "macro_f1": 0.8, "model_bytes": 1000, "accuracy_ci95": [0.5, 0.9]}
    shown |= {"ece": 0.31, "confidence_auroc": 0.62}  # the first split's
    once = fake_record("once", [True] * 8 + [False] * 2) | shown
    repeated = fake_record("repeated", [True] * 8 + [False] * 2, repeats=[0.8, 0.9, 0.7]) | shown
    repeated |= {"ece_mean": 0.04, "confidence_auroc_mean": 0.91}
    by_run = {row["run"]: row for row in rows([once, repeated])}
    assert (by_run["once"]["ECE"], by_run["once"]["AUROC"]) == ("0.31", "0.62")
    assert (by_run["repeated"]["ECE"], by_run["repeated"]["AUROC"]) == ("0.04", "0.91")


def test_the_compare_table_reads_well_at_80_columns(codes, tmp_path):
    for options in ([], ["--name", "l2-flip", "--normalize", "l2"]):
        result = cli(
            "fit-svm",
            codes["features"],
            "--out",
            tmp_path,
            "--classifier",
            "linear-svm",
            "--cv",
            "2",
            "--quiet",
            *options,
        )
        assert result.exit_code == 0, result.output
    records = rank(load_records([tmp_path]))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(rich_table(records, title="runs", width=80))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(x for x in lines if "#" in x).split()
    assert header[-1] == "AUROC"  # the last column whole: ECE leaves first when the names need the room
    for record in records:  # every run name whole, on one line, with its CV score, accuracy, p-value and AUROC
        line = next(line for line in lines if record["run"] in line.split())
        assert f"{100 * record['accuracy']:.1f}%" in line and line.rstrip().endswith(
            f"{record['confidence_auroc']:.2f}"
        )
        assert ("ECE" not in header) or f"{record['ece']:.2f}" in line
        assert f"{record['cv_score']:.3f} cv" in line and ("chosen" in line) == record["chosen"]
    # Names as long as MobileNetV2's stay whole at 80 columns, with every number (ECE makes room).
    long = [{**r, "run": f"mobilenetv2-out_relu-{r['run'][-10:]}"} for r in records]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(rich_table(long, width=80))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80 and next(x for x in lines if "#" in x).split()[-1] == "AUROC"
    for r in long:
        line = next(line for line in lines if r["run"] in line.split())
        assert line.rstrip().endswith(f"{r['confidence_auroc']:.2f}") and f"{100 * r['accuracy']:.1f}%" in line
    # At 120 columns every column fits short run names; long ones (a folder prefixed) make the narrow layout.
    for names, header in ((["a", "b"], "size"), ([f"models-of-today/{r['run']}" for r in records], "AUROC")):
        named = [{**r, "run": name} for r, name in zip(records, names)]
        console = Console(width=120, record=True, file=io.StringIO())
        console.print(rich_table(named, width=120))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= 120
        head = next(line.split() for line in text.splitlines() if line.split()[:2] == ["#", "run"])
        assert head[-1] == header and all(r["run"] in text for r in named)


def test_a_record_without_a_split_fingerprint_is_a_one_line_error(codes, tmp_path):
    result = cli("fit-svm", codes["features"], "--out", tmp_path / "m", "--classifier", "knn", "--cv", "2", "--quiet")
    assert result.exit_code == 0, result.output
    shutil.copytree(tmp_path / "m", tmp_path / "old")
    record_path = tmp_path / "old" / "vgg16-block5_pool-knn.json"
    record = json.loads(record_path.read_text())
    del record["dataset"]["split_fingerprint"]
    record_path.write_text(json.dumps(record))
    result = cli("compare", tmp_path / "old")
    assert result.exit_code == 2 and "no split fingerprint" in result.stderr and "Traceback" not in result.output


def test_a_file_name_that_is_not_utf8_gets_a_subset():
    odd = b"caf\xe9.jpg".decode("utf-8", errors="surrogateescape")
    split = assign_subsets([odd, "a.jpg", "b.jpg"], ["x", "x", "x"], [0, 1, 2], (0.34, 0.33, 0.33), 0)
    assert sorted(split.subsets) == ["test", "train", "val"]
