# syntax=docker/dockerfile:1.6
# `cnncodes serve` in a container, the model baked in and converted for ONNX Runtime at build time,
# so a pod starts in seconds, never imports TensorFlow and never needs the conversion's memory:
#
#   docker build -t cnncodes-serve \
#     --build-context weights=../shared/weights \
#     --build-arg MODEL_DIR=models/flowers --build-arg MODEL=mobilenetv2-out_relu-logreg.joblib .
#   docker run --rm -p 8000:8000 --cpus 2 cnncodes-serve
#
# MODEL_DIR (inside the build context) holds the .joblib or .keras file and its .json run record;
# the `weights` build context holds the ImageNet weights file it was made with (for --weights none
# models any empty folder will do).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CNNCODES_CACHE_DIR=/opt/cnncodes/cache \
    CNNCODES_WEIGHTS_DIR=/opt/cnncodes/weights \
    TF_CPP_MIN_LOG_LEVEL=3

WORKDIR /opt/cnncodes/src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install '.[serve]' && useradd --create-home --uid 10001 cnncodes

ARG MODEL_DIR=models
ARG MODEL=model.joblib
COPY --from=weights . /opt/cnncodes/weights/
COPY ${MODEL_DIR}/ /models/
RUN mkdir -p "$CNNCODES_CACHE_DIR" && chown cnncodes "$CNNCODES_CACHE_DIR"
ENV CNNCODES_MODEL=/models/${MODEL}

USER 10001
# Verify the model and convert it once, here: the running container only loads the cached ONNX file.
RUN cnncodes prepare "$CNNCODES_MODEL"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# One process per container (scale with replicas); threads = the container's CPU limit.
CMD ["sh", "-c", "exec cnncodes serve \"$CNNCODES_MODEL\" --host 0.0.0.0 --port 8000 --threads ${CNNCODES_THREADS:-2}"]
