"""A fine-tune whose batch cannot fit in memory is refused in one line, before TensorFlow fails on it."""

from __future__ import annotations

import pytest

from .helpers import cli, make_dataset


@pytest.mark.parametrize(
    "options",
    [
        ["--batch-size", "1000000"],
        ["--batch-size", "1000000000"],
        ["--backbone", "smallcnn", "--weights", "none", "--image-size", "100000"],
    ],
)
def test_a_batch_beyond_the_machines_memory_is_one_line(tmp_path, options):
    data = make_dataset(tmp_path / "data", per_class=2)
    result = cli("finetune", data, "--out", tmp_path / "m", "--quiet", *options)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "GiB to train, this machine has" in result.stderr
    assert not (tmp_path / "m").exists()


def test_an_ordinary_batch_passes_the_check():
    from cnncodes.finetuning.spec import check_batch_fits

    check_batch_fits(32, 224)
