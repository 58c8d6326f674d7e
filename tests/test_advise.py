"""`cnncodes advise`: its candidates are extract's codes, the advice is written and runs, bad data is refused."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from cnncodes.advise.bootstrap import PairedDifference
from cnncodes.advise.candidates import Candidate
from cnncodes.advise.forward import TapsJob, tapped_rows
from cnncodes.advise.network import POOLINGS, TapLayout, tap_channels
from cnncodes.advise.recommend import DataOptions, Quadrant, commands
from cnncodes.advise.run import advise
from cnncodes.advise.suspects import out_of_fold_probabilities, suspects
from cnncodes.codes.extract import extract
from cnncodes.codes.features import load_features
from cnncodes.codes.plan import discover_data, file_ids
from cnncodes.codes.reading import Files
from cnncodes.core.errors import CnnCodesError
from tests.helpers import FAST_ARGS, cli, fast_spec, make_dataset, planted_flips, write_image

TAPS = ("block3_pool", "block4_pool", "block5_pool")


@pytest.fixture(scope="module")
def advised(tmp_path_factory):
    """Advice on three pattern classes with a copy of a stripes image filed under circles; its commands run (--fit)."""
    root = make_dataset(tmp_path_factory.mktemp("advise") / "data", per_class=14)
    write_image(root / "circles" / "zz_stripes.png", "stripes", seed=103)  # stripes/stripes_03.png's pixels
    (root / "squares" / "broken.jpg").write_bytes(b"not a jpeg")
    out = root.parent / "advice"
    two_sizes = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32,64", "--quiet"]
    result = cli("advise", root, "--out", out, *two_sizes, "--runtime", "keras", "--fit")
    return root, out, result


def test_advice_measures_every_depth_and_pooling_and_its_commands_reproduce_the_split(advised):
    root, out, result = advised
    assert result.exit_code == 0, result.output
    advice = json.loads((out / "advice.json").read_text())
    names = [m["name"] for m in advice["measurements"]]
    assert names[0] == "vgg16/block5_pool/avg" == advice["recommendation"]["default"]
    assert {f"vgg16/{layer}/{how}" for layer in TAPS for how in POOLINGS} <= set(names)
    kept = [m for m in advice["measurements"] if m["sizes"] == "kept" and len(m["layers"]) == 1]
    assert len(kept) == 3 and len(names) == len(set(names))  # the best three again with their sizes kept
    assert any("+" in name for name in names)  # the best depths joined too
    assert all(0 <= m["held_out_accuracy"] <= 1 and m["scheme"] for m in advice["measurements"])
    assert advice["recommendation"]["codes"] in names
    assert advice["quadrant"]["size"] == "small" and advice["quadrant"]["similarity"] in ("similar", "different")
    assert advice["images"]["scored"] == 43 and advice["images"]["measured"] < 43  # test images only scored
    first = shlex.split(advice["commands"][0])
    assert first[:3] == ["cnncodes", "extract", str(root)]
    assert shlex.join(first[-6:]) == "--split 0.7,0.15,0.15 --seed 0 --dup-threshold 4"
    assert {"forward pass (vgg16)", "measurements", "label issues", "all"} <= set(advice["seconds"])
    assert [s["path"] for s in advice["skipped"]] == ["squares/broken.jpg"] and "skipped 1 file(s)" in result.stderr
    page = (out / "advice.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "zz_stripes.png" in page  # plots, the copies listed


def test_the_copy_filed_under_another_class_is_listed_and_suspects_say_what_they_are(advised):
    _, out, _ = advised
    advice = json.loads((out / "advice.json").read_text())
    assert ["circles/zz_stripes.png", "stripes/stripes_03.png"] in advice["cross_class_duplicates"]
    for issue in advice["label_issues"]:
        assert issue["given"] != issue["suggested"] and issue["subset"] in ("train", "val", "test")
        assert issue["probability_suggested"] > issue["probability_given"]


def test_planted_wrong_labels_are_found_from_the_probe_s_held_out_outputs():
    """5 % of the labels of well-separated classes moved to another class: most are flagged, few others are."""
    codes, labels, _, moved = planted_flips(1, n=800, classes=5, dims=64, spread=1.2)
    n = len(labels)
    groups = np.arange(n)
    groups[1::50] = groups[0::50][: len(groups[1::50])]  # a few near-duplicate pairs, held out together
    probabilities = out_of_fold_probabilities(codes, labels, groups, strength=10.0)
    flagged = {s.index for s in suspects(labels, probabilities)}
    found = len(flagged & set(moved.tolist()))
    assert found >= 0.8 * len(moved) and found >= 0.8 * len(flagged)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)


def test_fit_runs_the_commands_so_compare_ranks_the_advice_beside_the_defaults(advised):
    _, out, result = advised
    records = [json.loads(p.read_text()) for p in (out / "models").glob("*.json")]
    layers = {r["layer"] for r in records}
    advice = json.loads((out / "advice.json").read_text())
    chosen = advice["recommendation"]["codes"].split("/")[1].replace("+", ",")
    assert {"block5_pool", chosen} == layers
    assert (out / "report.html").is_file() and "Chosen:" in result.output


@pytest.mark.parametrize(
    ("layers", "pooling", "sizes"),
    [
        (("block3_pool",), "gem", "mean"),
        (("block3_pool", "block5_pool"), "avg", "mean"),
        (("block4_pool",), "max", "kept"),
    ],
)
def test_a_candidate_s_codes_are_the_codes_extract_makes_with_its_options(tmp_path, layers, pooling, sizes):
    root = make_dataset(tmp_path / "data", per_class=3)
    options = {"image_size": "32,64", "keep_sizes": sizes == "kept"}
    spec = fast_spec(layer=",".join(layers), pooling=pooling, **options)
    extract(root, tmp_path / "features", spec, runtime="keras", progress=False)
    features = load_features(tmp_path / "features")
    layout = TapLayout(
        backbone="vgg16", layers=TAPS, poolings=POOLINGS, sizes=(32, 64), channels=tap_channels("vgg16", TAPS)
    )
    dataset = discover_data(root)
    job = TapsJob(spec=fast_spec(image_size="32,64"), runtime="keras", paths=Files(root, dataset.paths), layout=layout)
    rows = tapped_rows(tmp_path / "work", job, file_ids(dataset), progress=False)
    codes = Candidate(backbone="vgg16", layers=layers, pooling=pooling, sizes=sizes).codes(
        np.asarray(rows.rows), layout
    )
    order = [dataset.paths.index(p) for p in features.paths]
    np.testing.assert_allclose(codes[order], features.X, rtol=1e-4, atol=1e-5)


def test_the_advised_extract_publishes_the_codes_advise_stored_without_a_forward_pass(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=5)
    found = advise(root, tmp_path / "out", backbone="vgg16", weights="none", image_size="32", runtime="keras")
    assert len(found.seeded) == len({found.chosen, found.default.candidate})
    extract_default = shlex.split(found.commands[-3])
    assert extract_default[1] == "extract" and extract_default[4] in found.seeded
    result = cli(*extract_default[1:])
    assert result.exit_code == 0 and "0 computed, 15 reused" in result.output, result.output
    fresh = extract(root, tmp_path / "fresh", fast_spec(), runtime="keras", progress=False)
    np.testing.assert_allclose(load_features(extract_default[4]).X, load_features(fresh.out).X, rtol=1e-4, atol=1e-5)


def test_keep_sizes_needs_several_sizes(tmp_path):
    result = cli(
        "extract", make_dataset(tmp_path / "data", per_class=2), "--out", tmp_path / "f", *FAST_ARGS, "--keep-sizes"
    )
    assert result.exit_code == 2 and "--image-size 224,288,384" in result.output


def _quadrant(size: str, similarity: str) -> Quadrant:
    return Quadrant(size=size, similarity=similarity, per_class=2000, depth_gain=PairedDifference(0.1, 0.05, 0.2, 0.95))


def test_large_data_is_advised_to_fine_tune_first_deeper_when_it_differs_from_imagenet():
    chosen = Candidate(backbone="resnet50", layers=("conv4_block6_out",), pooling="gem")
    default = Candidate(backbone="mobilenetv2", layers=("out_relu",), pooling="avg")
    options = DataOptions(data="pics", split="0.8,0.1,0.1", seed=3, dup_threshold=-1, weights="none")
    similar = commands(chosen, default, _quadrant("large", "similar"), options, Path("adv"))
    different = commands(chosen, default, _quadrant("large", "different"), options, Path("adv"))
    assert similar[0].startswith("cnncodes finetune pics --out adv/models --backbone resnet50 --weights none")
    assert similar[0].endswith("--split 0.8,0.1,0.1 --seed 3 --dup-threshold -1 --cache-trunk")
    assert different[0].endswith("--unfreeze conv4_block6_out")
    assert "--layer conv4_block6_out --pooling gem" in similar[1] and "--name advised" in similar[2]
    small = commands(chosen, default, _quadrant("small", "different"), options, Path("adv"))
    assert not any("finetune" in line for line in small) and small[-1].startswith("cnncodes compare adv/models")


def test_a_large_dataset_is_sampled_with_every_class_in_its_share_and_other_backbones_measured_too(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=10)
    found = advise(
        root,
        tmp_path / "out",
        backbone="vgg16",
        backbones=["vgg19"],
        weights="none",
        image_size="32",
        runtime="keras",
        max_images=15,
        progress=False,
    )
    assert found.images["found"] == 30 and found.images["scored"] == 15
    assert {"vgg16/block5_pool/avg", "vgg19/block5_pool/max"} <= {m.candidate.name for m in found.measured}
    assert not found.seeded  # a sample's codes are not every image's: no features folder is filled
    advice = json.loads((tmp_path / "out" / "advice.json").read_text())
    assert advice["images"] == found.images


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"only": 6}, "2 classes"),
        ({"a": 6, "b": 1}, "2 images"),
    ],
)
def test_data_too_small_to_measure_gets_one_line_before_any_forward_pass(tmp_path, layout, message):
    for label, count in layout.items():
        for i in range(count):
            write_image(tmp_path / "data" / label / f"{i}.png", "stripes", seed=i)
    result = cli("advise", tmp_path / "data", "--out", tmp_path / "out", *FAST_ARGS)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob(".cache/taps-*"))


def test_an_unknown_backbone_lists_the_valid_ones(tmp_path):
    result = cli("advise", make_dataset(tmp_path / "data"), "--out", tmp_path / "out", "--backbones", "vgg17")
    assert result.exit_code == 2 and "mobilenetv2" in result.output
    bad_size = cli("advise", tmp_path / "data", "--out", tmp_path / "sized", "--image-size", "abc")
    assert bad_size.exit_code == 2 and "--image-size" in bad_size.output and not (tmp_path / "sized").exists()
    with pytest.raises(CnnCodesError, match="at least 4"):
        advise(tmp_path / "data", tmp_path / "out", max_images=2)
