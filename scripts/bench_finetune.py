"""Seconds per epoch and test accuracy of `cnncodes finetune`, with and without `--cache-trunk`.

On ../shared/datasets/cats_dogs_horses_humans, one split (seed 0) for every row, in one run:
  MobileNetV2 (real ImageNet weights) at --size px: head only; head + top block; head +
  top block without augmentation (the fair twin of the next row); head + top block with
  --cache-trunk; and the small ConvNet trained from scratch, the baseline.
  VGG16 (no ImageNet weights on this machine: speed only, its accuracy means nothing):
  one head and one fine epoch, with and without --cache-trunk.
Seconds per epoch are the median over the epochs of a phase (train + validation); the
one-time cost of --cache-trunk (computing the activations) has its own column.

    .venv/bin/python scripts/bench_finetune.py [--size 160] [--epochs 5] [--work /tmp/cnncodes-finetune]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "datasets" / "cats_dogs_horses_humans"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configurations(args) -> list[tuple[str, dict]]:
    """(label, `make_spec` arguments) of every row."""
    e, size = args.epochs, args.size
    mobilenet = dict(backbone="mobilenetv2", weights="imagenet", image_size=size)
    vgg = dict(backbone="vgg16", weights="none", image_size=size, head_epochs=1, fine_epochs=1)
    return [
        ("mobilenetv2 head only", mobilenet | dict(head_epochs=e, fine_epochs=0)),
        ("mobilenetv2 head + top block", mobilenet | dict(head_epochs=e, fine_epochs=e)),
        (
            "mobilenetv2 head + top block, no augmentation",
            mobilenet | dict(head_epochs=e, fine_epochs=e, augment=False),
        ),
        (
            "mobilenetv2 head + top block, --cache-trunk",
            mobilenet | dict(head_epochs=e, fine_epochs=e, cache_trunk=True),
        ),
        (
            "smallcnn from scratch (64 px)",
            dict(
                backbone="smallcnn", weights="none", image_size=64, head_epochs=3 * e, fine_epochs=3 * e, patience=2 * e
            ),
        ),
        ("vgg16 head + top block, no augmentation (untrained: speed only)", vgg | dict(augment=False)),
        ("vgg16 head + top block, --cache-trunk (untrained: speed only)", vgg | dict(cache_trunk=True)),
    ]


def epoch_seconds(record: dict, phase: str) -> str:
    seconds = [h["seconds"] for h in record["history"] if h["phase"] == phase]
    return f"{statistics.median(seconds):.1f}" if seconds else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each phase (early stopping may cut them)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-finetune"))
    args = parser.parse_args()

    import cnncodes
    from cnncodes.finetuning.spec import make_spec
    from cnncodes.finetuning.train import finetune

    shutil.rmtree(args.work, ignore_errors=True)
    features = args.work / "split"
    spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", image_size=96)
    cnncodes.extract(DATA, features, spec, progress=False)  # the shared split
    print(
        f"# finetune on cats_dogs_horses_humans, {args.size} px, batch {args.batch_size}, "
        f"{os.cpu_count()} cores, seed 0\n"
    )
    print("| run | epochs run | s/epoch head | s/epoch fine | one-time trunk s | total s | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for i, (label, options) in enumerate(configurations(args)):
        started = time.perf_counter()
        spec = make_spec(batch_size=args.batch_size, **options)
        record = finetune(DATA, args.work / f"models-{i}", spec, split_from=features, progress=False)
        total = time.perf_counter() - started
        phases = ("scratch", "-") if options["backbone"] == "smallcnn" else ("head", "fine")
        trunk = record["extract_seconds"]
        print(
            f"| {label} | {record['epochs_run']} | {epoch_seconds(record, phases[0])} | "
            f"{epoch_seconds(record, phases[1])} | {f'{trunk:.0f}' if trunk else '-'} | {total:.0f} | "
            f"{record['accuracy']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
