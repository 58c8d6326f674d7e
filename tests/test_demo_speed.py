"""The demo's own data: a sample of scikit-learn's digits small enough for a first run of about 90 s."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnncodes.core.errors import CnnCodesError
from cnncodes.demo import digits_folder, write_digits

from .helpers import cli, needs_real_weights


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


def test_the_digits_sample_is_the_same_per_class_of_each_digit_and_named_by_its_size(tmp_path):
    folder = write_digits(per_class=3, root=tmp_path)
    assert folder == digits_folder(per_class=3, root=tmp_path) == tmp_path / "digits-30"
    files = _files(folder)
    assert [f.split("/")[0] for f in files] == [str(d) for d in range(10) for _ in range(3)]
    assert len({f.split("/")[1][:4] for f in files}) == 30  # 30 different scans, named by their place
    ink = np.asarray(Image.open(folder / files[0]))
    assert ink.shape == (8, 8) and ink.max() == 255  # dark ink on white paper
    assert write_digits(per_class=3, root=tmp_path) == folder and _files(folder) == files  # the same draw
    larger = write_digits(per_class=5, root=tmp_path)
    assert larger == tmp_path / "digits-50" and set(files) <= set(_files(larger))
    with pytest.raises(CnnCodesError, match="2 or more digits per class"):
        write_digits(per_class=1, root=tmp_path)
    whole = write_digits(per_class=500, root=tmp_path)
    assert whole == tmp_path / "digits" and len(_files(whole)) == 1797


@needs_real_weights
@pytest.mark.slow
def test_the_demo_without_data_says_how_many_digits_it_left_out_and_where_it_wrote_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("demo", "--digits-per-class", "6", "--image-size", "32")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "Writing 60 of the 1,797 handwritten digits that scikit-learn ships (6 of each, drawn at random)" in said
    assert "to data/digits-60/; the other 1,737 are left out" in said and "--digits-per-class 183 takes all" in said
    assert len(_files(tmp_path / "data" / "digits-60")) == 60
    listed = json.loads(cli("compare", tmp_path / "models" / "digits-60", "--format", "json").stdout)
    assert sum(r["n_train"] + r["n_test"] for r in listed[:1]) == 60
    assert cli("demo", "--digits-per-class", "1").exit_code == 2
