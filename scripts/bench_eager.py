"""A fine-tune's phases traced into graphs against run eagerly, by training steps: where `EAGER_STEPS` sits.

Keras traces a phase's train, validation and predict functions before its first step; a
phase of few steps (epochs x batches) spends more on tracing than graphs give back, so
`finetune` runs such phases eagerly (`cnncodes.finetuning.phases.EAGER_STEPS`). This script
times the same fine-tune both ways, side by side in one run (alternating, best of `--repeats`),
on the demo's digits at 32 px (an untrained VGG16, batch 8), for several training-set sizes.

    .venv/bin/python scripts/bench_eager.py [--repeats 2] [--work /tmp/cnncodes-eager]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (digits per class, epochs of each phase) of each row: 3 to 33 steps (batches of 8) per phase.
ROWS = ((4, 1), (4, 2), (4, 3), (12, 3))
BATCH = 8


def timed(data: Path, out: Path, *, epochs: int, eager: bool) -> tuple[float, int]:
    """Seconds of one fine-tune with every phase eager, or every phase traced, and its training images."""
    from cnncodes.finetuning import phases
    from cnncodes.finetuning.train import finetune, make_spec

    phases.EAGER_STEPS = 10**9 if eager else -1
    shutil.rmtree(out, ignore_errors=True)
    spec = make_spec(
        backbone="vgg16", weights="none", image_size=32, batch_size=BATCH, head_epochs=epochs, fine_epochs=epochs
    )
    started = time.perf_counter()
    record = finetune(data, out, spec, progress=False)
    return time.perf_counter() - started, record["n_train"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way per size (the best is kept)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnncodes-eager"))
    args = parser.parse_args()
    from cnncodes.demo import write_digits

    print("| digits | train images | epochs per phase | steps per phase | traced (s) | eager (s) | eager / traced |")
    print("|---|---|---|---|---|---|---|")
    for per_class, epochs in ROWS:
        data = write_digits(per_class=per_class, root=args.work / "data")
        best, n_train = {True: math.inf, False: math.inf}, 0
        for _ in range(args.repeats):
            for eager in (False, True):
                seconds, n_train = timed(data, args.work / "models", epochs=epochs, eager=eager)
                best[eager] = min(best[eager], seconds)
        steps = epochs * math.ceil(n_train / BATCH)
        print(
            f"| {per_class * 10} | {n_train} | {epochs} | {steps} | {best[False]:.1f} | {best[True]:.1f} | "
            f"{best[True] / best[False]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
