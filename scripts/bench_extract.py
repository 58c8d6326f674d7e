"""Throughput of `cnncodes extract` on both runtimes, against its ceiling and the tutorial loop.

For each backbone, on the same N images from ../shared/datasets/oxford17flowers, in one run:
  extract     `cnncodes.codes.extract` end to end (decode + resize + forward + write), images/s of
              its extraction loop, with `--runtime onnx` and `--runtime keras`, and the peak
              RSS of the whole process;
  forward     the same extractor's forward pass alone on preloaded pixel batches of the same
              batch size, on each runtime (the ceiling on this machine);
  tutorial    the loop Keras tutorials use: load_img + img_to_array + preprocess_input +
              model.predict, one image at a time.
Every measurement runs in a fresh subprocess, timed the same way (first batch included);
extract and forward are measured in --repeats interleaved rounds and the median is shown.
Then: memory bounded by the batch, not the dataset; the whole-process time of a one-image
`cnncodes predict` with a warm ONNX cache; and `extract --precision int8` against fp32 on
ONNX Runtime (interleaved rounds, after a first int8 run that quantizes). Every table runs at
`--size` (224 by default, one size); `--tables sizes` measures MobileNetV2's default codes,
averaged over three sizes, against it.

    .venv/bin/python scripts/bench_extract.py [--images 256] [--backbones mobilenetv2,resnet50,vgg16] [--tables sizes]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATASETS = SHARED / "datasets"
os.environ.setdefault("CNNCODES_WEIGHTS_DIR", str(SHARED / "weights"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def image_list(n: int, datasets: tuple[str, ...] = ("oxford17flowers",)) -> list[tuple[Path, str]]:
    """The first n images, spread evenly over the classes of the datasets."""
    found = []
    for name in datasets:
        for class_dir in sorted(p for p in (DATASETS / name).iterdir() if p.is_dir()):
            found += [(f, f"{name}/{class_dir.name}") for f in sorted(class_dir.glob("*.jpg"))]
    step = max(1, len(found) // n)
    return found[::step][:n]


def weights_for(backbone: str) -> str:
    """Real ImageNet weights where they are on disk; speed does not depend on the values."""
    from cnncodes.nets.backbones import get_backbone
    from cnncodes.nets.weights import search_dirs

    entry = get_backbone(backbone)
    return "imagenet" if any((d / entry.weights_file).is_file() for d in search_dirs()) else "none"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def work_extract(args) -> dict:
    import cnncodes

    listing = Path(args.tmp) / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in image_list(args.images, args.datasets)))
    started = time.perf_counter()
    spec = cnncodes.ExtractorSpec.create(
        backbone=args.backbone, weights=weights_for(args.backbone), image_size=args.size, precision=args.precision
    )
    result = cnncodes.extract(
        listing,
        Path(args.out or Path(args.tmp) / "out"),
        spec,
        batch_size=args.batch_size,
        runtime=args.runtime,
        progress=False,
    )
    return {
        "images_per_second": result.images_per_second,
        "wall_seconds": time.perf_counter() - started,
        "images": result.n_images,
        "peak_rss_mb": peak_rss_mb(),
    }


def work_forward(args) -> dict:
    from cnncodes import ExtractorSpec
    from cnncodes.data.decode import load_square

    spec = ExtractorSpec.create(backbone=args.backbone, image_size=args.size, weights=weights_for(args.backbone))
    pixels = np.stack([load_square(p, spec.image_size) for p, _ in image_list(args.images)])
    run = spec.runner(spec.recorded_weights, args.runtime)
    started = time.perf_counter()
    for start in range(0, len(pixels), args.batch_size):
        run(pixels[start : start + args.batch_size])
    return {"images_per_second": len(pixels) / (time.perf_counter() - started)}


def work_tutorial(args) -> dict:
    import keras

    from cnncodes.codes.spec import input_sizes
    from cnncodes.nets.backbones import get_backbone

    entry = get_backbone(args.backbone)
    size = max(input_sizes(args.size, [entry.default_size]))  # the tutorial sees one size
    base = getattr(keras.applications, entry.constructor)(include_top=False, weights=None, input_shape=(size, size, 3))
    model = keras.Sequential([base, keras.layers.GlobalAveragePooling2D()])
    paths = [p for p, _ in image_list(args.tutorial_images)]
    started = time.perf_counter()
    for path in paths:
        x = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(size, size)))
        x = entry.preprocess_input(np.expand_dims(x, 0))
        model.predict(x, verbose=0)
    return {"images_per_second": len(paths) / (time.perf_counter() - started)}


WORKERS = {"extract": work_extract, "forward": work_forward, "tutorial": work_tutorial}


def measure(kind: str, backbone: str, args, **overrides) -> dict:
    """Run one measurement in a fresh interpreter, so each starts cold and has its own peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        options = vars(args) | {"backbone": backbone, "tmp": tmp, "out": None} | overrides
        command = [sys.executable, __file__, "--worker", kind, "--options", json.dumps(options)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} {backbone} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput_table(args) -> None:
    print(
        f"# extract throughput: {args.images} images of oxford17flowers, batch {args.batch_size}, "
        f"{os.cpu_count()} cores (images/s, median of {args.repeats} interleaved rounds)\n"
    )
    print(
        "| backbone | weights | extract onnx | extract keras | forward onnx | forward keras | tutorial loop | "
        "onnx / keras extract | onnx extract / onnx forward | keras extract / keras forward | "
        "onnx extract / tutorial | peak RSS onnx extract |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for backbone in args.backbones.split(","):
        # forward first: it converts to ONNX, so extract measures the warm steady state (RSS too).
        # Rounds interleave the runtimes, so a slow spell of this shared machine hits both alike.
        rounds = [
            {
                (kind, rt): measure(kind, backbone, args, runtime=rt)
                for kind in ("forward", "extract")
                for rt in ("onnx", "keras")
            }
            for _ in range(args.repeats)
        ]
        run = rounds[-1]
        speed = {key: statistics.median(r[key]["images_per_second"] for r in rounds) for key in run}
        tutorial = measure("tutorial", backbone, args)["images_per_second"]
        eo, ek, fo, fk = (
            speed["extract", "onnx"],
            speed["extract", "keras"],
            speed["forward", "onnx"],
            speed["forward", "keras"],
        )
        print(
            f"| {backbone} | {weights_for(backbone)} | {eo:.1f} | {ek:.1f} | {fo:.1f} | {fk:.1f} | {tutorial:.1f} | "
            f"{eo / ek:.2f} | {eo / fo:.2f} | {ek / fk:.2f} | {eo / tutorial:.1f} | "
            f"{run['extract', 'onnx']['peak_rss_mb']:.0f} MB |",
            flush=True,
        )


def memory_table(args) -> None:
    both = ("oxford17flowers", "cats_dogs_horses_humans")
    total = len(image_list(10**6, both))
    print(f"\n# extract memory: mobilenetv2 at {args.memory_size} px, onnx, the dataset 10x larger\n")
    print("| images | extract img/s | peak RSS |")
    print("|---|---|---|")
    measure("extract", "mobilenetv2", args, images=8, size=args.memory_size)  # warms the ONNX cache
    for n in (total // 10, total):
        run = measure("extract", "mobilenetv2", args, images=n, datasets=both, size=args.memory_size, runtime="onnx")
        print(f"| {run['images']} | {run['images_per_second']:.1f} | {run['peak_rss_mb']:.0f} MB |", flush=True)


def int8_table(args) -> None:
    """`extract --precision int8` against fp32 on ONNX Runtime, in interleaved rounds."""
    print(
        f"\n# int8 against fp32 extract on ONNX Runtime: {args.images} images, batch {args.batch_size} "
        f"(images/s, median of {args.repeats} interleaved rounds)\n"
    )
    print("| backbone | weights | extract fp32 | extract int8 | int8 / fp32 | int8 agreement (mean / min cosine) |")
    print("|---|---|---|---|---|---|")
    for backbone in args.backbones.split(","):
        with tempfile.TemporaryDirectory() as tmp:  # the first int8 run quantizes; its meta has the agreement
            measure("extract", backbone, args, precision="int8", out=str(Path(tmp) / "f"))
            agreement = json.loads((Path(tmp) / "f" / "meta.json").read_text())["extractor"]["quantization"][
                "agreement"
            ]
        rounds = [
            {p: measure("extract", backbone, args, precision=p) for p in ("fp32", "int8")} for _ in range(args.repeats)
        ]
        fp32, int8 = (statistics.median(r[p]["images_per_second"] for r in rounds) for p in ("fp32", "int8"))
        print(
            f"| {backbone} | {weights_for(backbone)} | {fp32:.1f} | {int8:.1f} | {int8 / fp32:.2f} | "
            f"{agreement['mean']:.4f} / {agreement['min']:.4f} |",
            flush=True,
        )


def sizes_table(args) -> None:
    """MobileNetV2's default codes (averaged over its three sizes) against one size, on ONNX Runtime."""
    print(
        f"\n# mobilenetv2 extract at --size {args.size} against its default sizes: {args.images} images, onnx "
        f"(images/s, median of {args.repeats} interleaved rounds)\n"
    )
    measure("extract", "mobilenetv2", args, size=None)  # converts both models before timing
    measure("extract", "mobilenetv2", args)
    rounds = [
        {s: measure("extract", "mobilenetv2", args, size=s) for s in (args.size, None)} for _ in range(args.repeats)
    ]
    one, default = (statistics.median(r[s]["images_per_second"] for r in rounds) for s in (args.size, None))
    print("| --size | images/s | time / one size's |\n|---|---|---|")
    print(f"| {args.size} | {one:.1f} | 1.00 |\n| default (224,288,384) | {default:.1f} | {one / default:.2f} |")


def predict_table(args) -> None:
    """Whole-process seconds of `cnncodes predict BUNDLE one.jpg`, the ONNX model already cached."""
    cli = Path(sys.executable).parent / "cnncodes"
    image = str(image_list(1)[0][0])
    print("\n# one-image predict, whole process, warm cache (median of 5)\n")
    print("| backbone | runtime | seconds |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones.split(","):
            out = Path(tmp) / backbone
            measure("extract", backbone, args, images=136, out=str(out / "features"), runtime="onnx")
            subprocess.run(
                [
                    str(cli),
                    "fit-svm",
                    str(out / "features"),
                    "--out",
                    str(out / "models"),
                    "--classifier",
                    "logreg",
                    "--cv",
                    "2",
                    "--quiet",
                ],
                check=True,
            )
            bundle = next((out / "models").glob("*.joblib"))
            for runtime in ("onnx", "keras"):
                command = [str(cli), "predict", str(bundle), image, "--quiet", "--runtime", runtime]
                subprocess.run(command, check=True, capture_output=True)
                times = []
                for _ in range(5):
                    started = time.perf_counter()
                    subprocess.run(command, check=True, capture_output=True)
                    times.append(time.perf_counter() - started)
                print(f"| {backbone} | {runtime} | {sorted(times)[2]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tutorial-images", type=int, default=64, help="the per-image loop is slow: fewer images")
    parser.add_argument("--backbones", default="mobilenetv2,resnet50,vgg16")
    parser.add_argument("--size", default="224", help="input size, or sizes whose codes are averaged (224,288)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the extract and forward runs (median)")
    parser.add_argument("--memory-size", type=int, default=96, help="input size of the memory table's runs")
    parser.add_argument("--tables", default="throughput,memory,predict,int8", help="which tables to measure")
    parser.add_argument("--runtime", default="onnx", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        options = argparse.Namespace(**json.loads(args.options))
        options.datasets = tuple(options.datasets)
        print(json.dumps(WORKERS[args.worker](options)))
        return
    args.datasets = ("oxford17flowers",)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CNNCODES_CACHE_DIR"] = cache  # conversions are shared by this run's measurements only
        for table in args.tables.split(","):
            TABLES[table](args)


TABLES = {
    "throughput": throughput_table,
    "memory": memory_table,
    "predict": predict_table,
    "int8": int8_table,
    "sizes": sizes_table,
}

if __name__ == "__main__":
    main()
