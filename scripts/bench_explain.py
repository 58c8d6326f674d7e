"""Throughput of `cnncodes explain --no-faithfulness` against `cnncodes predict` on the same images.

Two models, each explained and predicted on the same N images of ../shared/datasets/oxford17flowers:
  linear      a logreg bundle on ImageNet MobileNetV2 codes (`extract` + `fit-svm --classifier
              logreg` on those images, the default codes: three sizes averaged): exact CAM;
  finetuned   a fine-tuned MobileNetV2 `.keras` model (`finetune` on the same images, a small
              one: --finetune-size px, one head and one fine epoch; or --finetuned PATH): Grad-CAM.
Each call is `cnncodes.explain.run.explain` / `cnncodes.serving.predict.predict` in this
process, timed end to end (loading the model, decoding, forward passes, and for explain the
maps and the PNGs and .npy files it writes), with each command's default batch size. The
ONNX cache and Keras are warmed first by a call of each on a few images, so conversions and
imports are not counted. Rounds alternate the two commands (which goes first alternates too),
so a slow spell of this shared machine hits both alike; medians of --repeats rounds, and
explain / predict. The issue's target: explain >= 0.5 of predict's images/s for linear bundles.
--profile: instead, cProfile of one explain call of the linear bundle, the top functions by own time.

    .venv/bin/python scripts/bench_explain.py [--images 256] [--repeats 3] [--finetuned PATH] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench_accuracy import machine
from bench_extract import image_list

CLI = str(Path(sys.executable).parent / "cnncodes")
WARMUP_IMAGES = 4


def cli(*args: str) -> None:
    subprocess.run([CLI, *args, "--quiet"], check=True)


def listing(images: list[tuple[Path, str]], path: Path) -> Path:
    """The images as a path,label CSV, which `extract` and `finetune` take."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows((str(p), label.rsplit("/", 1)[1]) for p, label in images)
    return path


def linear_bundle(data: Path, work: Path, size: str | None) -> Path:
    sizes = ["--image-size", size] if size else []
    cli("extract", str(data), "--out", str(work / "features"), *sizes)
    cli("fit-svm", str(work / "features"), "--out", str(work / "models"), "--classifier", "logreg", "--cv", "2")
    return next((work / "models").glob("*logreg*.joblib"))


def finetuned_model(data: Path, work: Path, size: int) -> Path:
    epochs = ["--head-epochs", "1", "--fine-epochs", "1"]
    cli("finetune", str(data), "--out", str(work / "finetuned"), "--image-size", str(size), *epochs)
    return next((work / "finetuned").glob("*.keras"))


def timed(command: str, model: Path, images: list[str], out: Path) -> float:
    """Seconds of one predict or explain call on `images`."""
    from cnncodes.explain.run import explain
    from cnncodes.serving.predict import predict

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    if command == "predict":
        predict(model, images, progress=False)
    else:
        explain(model, images, out, faithfulness=False, progress=False)
    return time.perf_counter() - started


def profile(model: Path, images: list[str], out: Path, top: int) -> None:
    from cnncodes.explain.run import explain

    profiler = cProfile.Profile()
    profiler.runcall(explain, model, images, out, faithfulness=False, progress=False)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("cnncodes", top)
    print(f"\n# cProfile of explain --no-faithfulness, {model.name}, {len(images)} images (by own, then total time)\n")
    print(text.getvalue())


def rounds(models: dict[str, Path], paths: list[str], out: Path, repeats: int) -> dict[tuple[str, str], list[float]]:
    """Seconds of each (model, command) call per round; the commands alternate, and so does which goes first."""
    seconds: dict[tuple[str, str], list[float]] = {}
    for round_ in range(repeats):
        for name, model in models.items():
            order = ("predict", "explain") if round_ % 2 == 0 else ("explain", "predict")
            for command in order:
                seconds.setdefault((name, command), []).append(timed(command, model, paths, out))
                print(f"round {round_ + 1}: {name} {command} {seconds[name, command][-1]:.1f} s", file=sys.stderr)
    return seconds


def table(models: dict[str, Path], paths: list[str], seconds: dict[tuple[str, str], list[float]], repeats: int) -> None:
    print(
        f"# explain --no-faithfulness against predict, {len(paths)} Flowers-17 images, {date.today()}, "
        f"median of {repeats} interleaved rounds, each command's default batch size\n# {machine()}\n"
    )
    print("| model | file | predict img/s | explain img/s | explain / predict | target ≥ 0.5 |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        predict_rate, explain_rate = (
            len(paths) / statistics.median(seconds[name, command]) for command in ("predict", "explain")
        )
        ratio = explain_rate / predict_rate
        target = ("met" if ratio >= 0.5 else "**missed**") if name.startswith("linear") else "-"
        print(f"| {name} | {model.name} | {predict_rate:.1f} | {explain_rate:.1f} | {ratio:.2f} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--size", help="the linear bundle's --image-size (default: the backbone's default sizes)")
    parser.add_argument("--bundle", type=Path, help="a linear .joblib bundle to use instead of fitting one")
    parser.add_argument("--finetuned", type=Path, help="a fine-tuned .keras model to use instead of training one")
    parser.add_argument("--finetune-size", type=int, default=160, help="input size of the model trained here")
    parser.add_argument("--work", type=Path, help="folder for the models made here (default: a temporary one)")
    parser.add_argument("--profile", action="store_true", help="profile one explain call of the linear bundle instead")
    args = parser.parse_args()
    images = image_list(args.images)
    paths = [str(p) for p, _ in images]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = listing(images, work / "images.csv")
        linear = args.bundle or linear_bundle(data, work / "linear", args.size)
        models = {"linear (logreg, CAM)": linear}
        if not args.profile:
            models["fine-tuned (Grad-CAM)"] = args.finetuned or finetuned_model(
                data, work / "finetuned", args.finetune_size
            )
        out = Path(tmp) / "explained"
        for model in models.values():  # conversions, Keras's import and load: not the steady state
            for command in ("predict", "explain"):
                timed(command, model, paths[:WARMUP_IMAGES], out)
        if args.profile:
            profile(linear, paths, out, top=25)
        else:
            table(models, paths, rounds(models, paths, out, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
