"""What `cnncodes fit-svm` says of each fitted model: its chosen settings in the user's units."""

from __future__ import annotations

import json
import re

from .helpers import cli, make_dataset


def test_fit_svm_says_k_nn_s_k_in_images_when_trained_on_several_views_of_each(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    options = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32,48", "--quiet"]
    assert cli("extract", data, "--out", tmp_path / "features", *options).exit_code == 0
    result = cli("fit-svm", tmp_path / "features", "--out", tmp_path / "models", "--classifier", "knn", "--cv", "3")
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "models" / "vgg16-block5_pool-knn.json").read_text())["params"]
    assert params["views"] == 2 and params["n_neighbors"] % 2 == 0  # the model counts codes: k images' two views
    said = " ".join(result.output.split())
    k = params["n_neighbors"] // 2
    assert re.search(
        rf"knn: normalize=\w+, k={k} images? = {params['n_neighbors']} codes, 2 per image \(cv score", said
    )
    assert "n_neighbors" not in said
