"""The choices the CLI offers that live in heavy modules, importable without their imports.

The CLI builds its option choices from these at start-up; importing scikit-learn there
would cost every command, `extract` included, about two seconds (TensorFlow, eight).
"""

from typing import Literal, get_args

KINDS = ("linear-svm", "logreg", "rbf-svm", "knn", "sgd")
# Training codes above which `--classifier all` fits logreg and sgd only: libsvm's SVC is quadratic
# in samples (measured: linear-svm 201 s on 10,000 codes with one normalisation and 3 folds,
# unfinished after 240 s on 50,000; the defaults search 5x those fits), and k-NN's prediction
# scans every training code.
MAX_EXACT = 20_000
# auto: each of the others with its own grid, chosen by cross-validation.
Normalize = Literal["auto", "standard", "l2", "none"]
NORMALIZERS: tuple[str, ...] = get_args(Normalize)
# `extract --engine`: this machine, or a Ray cluster.
EngineName = Literal["local", "ray"]
# `demo` with no data: the digits of each class it writes, 500 of scikit-learn's 1,797, so that a first run
# shows the whole pipeline in about 90 s (fit-svm's searches grow faster than the images; docs/benchmarks.md).
DEMO_DIGITS_PER_CLASS = 50
# `finetune --backbone smallcnn`: the small ConvNet trained from scratch, the baseline for transfer learning.
SMALL_CNN = "smallcnn"
# `serve`: the largest request body, and the most pixels one upload may decode to (after JPEG's
# reduced-scale decoding). Pillow's decompression-bomb limit is 89 million pixels; a 3.4-kB lossless
# WebP of 88 million took 0.8 GB and 1.5 s to decode (measured; 16 million: 0.17 GB, 0.23 s), and a
# request may carry 256 of them.
SERVE_MAX_BYTES = 20_000_000
SERVE_MAX_PIXELS = 16_000_000
# `serve`: how long an image waits for others to share its forward pass, and the most images in one.
SERVE_BATCH_WAIT_MS = 5.0
SERVE_MAX_BATCH = 8  # measured: larger batches buy no images/s on a CPU and cost memory (docs/deployment.md)
