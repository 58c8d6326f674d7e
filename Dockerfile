# syntax=docker/dockerfile:1.6
# `cnncodes serve` in a container without TensorFlow, in two stages:
# - build: cnncodes with everything (TensorFlow included), the model baked in, and `cnncodes prepare`,
#   which verifies the model and converts its network for ONNX Runtime into the cache;
# - runtime: the package, deploy/serve-runtime.txt (ONNX Runtime, scikit-learn, NumPy, Pillow, FastAPI, …),
#   the model and the prepared cache. No TensorFlow, no Keras, no weights file: the cached ONNX model is the
#   network, so the pod starts in seconds and never needs the conversion's memory.
#
#   docker build -t cnncodes-serve --build-context weights=../shared/weights \
#     --build-arg MODEL_DIR=models/animals --build-arg MODEL=mobilenetv2-out_relu-logreg.joblib .
#   docker run --rm -p 8000:8000 --cpus 2 --memory 1280m cnncodes-serve
#
# MODEL_DIR (inside the build context) holds the .joblib or .keras file and its .json run record; the
# `weights` build context the ImageNet weights file it was made with (any empty folder for --weights none).
# The served model's path is CNNCODES_MODEL, /models/$MODEL: deploy/*.yaml set the same variable.
# The options after the model are the CMD: at --max-batch 8 the default MobileNetV2 model (codes at 224, 288 and
# 384 px) peaks at about 800 MiB, at 32 over 2 GiB (docs/deployment.md; deploy/serve-memory.json).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=3 \
    CNNCODES_CACHE_DIR=/opt/cnncodes/cache \
    CNNCODES_WEIGHTS_DIR=/opt/cnncodes/weights
WORKDIR /opt/cnncodes/src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[serve]' && pip wheel --no-deps --wheel-dir /opt/cnncodes/wheel .
ARG MODEL_DIR=models
ARG MODEL=mobilenetv2-out_relu-logreg.joblib
COPY --from=weights . /opt/cnncodes/weights/
COPY ${MODEL_DIR}/ /models/
RUN cnncodes prepare "/models/${MODEL}"

FROM ${PYTHON_IMAGE} AS runtime
ARG MODEL=mobilenetv2-out_relu-logreg.joblib
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CNNCODES_CACHE_DIR=/opt/cnncodes/cache \
    CNNCODES_MODEL=/models/${MODEL}
COPY deploy/serve-runtime.txt /opt/cnncodes/serve-runtime.txt
COPY --from=build /opt/cnncodes/wheel /opt/cnncodes/wheel
RUN pip install -r /opt/cnncodes/serve-runtime.txt \
    && pip install --no-deps /opt/cnncodes/wheel/*.whl \
    && rm -r /opt/cnncodes/wheel \
    && useradd --create-home --uid 10001 cnncodes
COPY --from=build /models /models
COPY --from=build --chown=10001 /opt/cnncodes/cache /opt/cnncodes/cache

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# One process per container (scale with replicas); --threads = the container's CPU limit, which Python cannot see.
ENTRYPOINT ["sh", "-c", "exec cnncodes serve \"$CNNCODES_MODEL\" \"$@\"", "cnncodes-serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--threads", "2", "--max-batch", "8", "--no-explain"]
