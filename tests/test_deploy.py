"""The container and the manifests (Docker and Kubernetes cannot run here), checked against what can run:
a live `cnncodes serve` started with the manifests' own options, the measured peak memory they are sized from,
and a serve-only virtual environment without TensorFlow, built as the Dockerfile's runtime stage is."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

import cnncodes
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.nets.backbones import get_backbone
from cnncodes.runtime import runners
from cnncodes.serving.predict import load_predictor

from .helpers import CNNCODES, MOBILENET_WEIGHTS, cli, free_port, make_dataset, run_lock, session_root, upload

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# The memory limit over the measured peak: the kernel counts page cache and the allocator's slack too.
HEADROOM = 1.2
CONVERTERS = ("tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx")


def manifests() -> dict[str, dict]:
    """Every document of deploy/kubernetes.yaml and deploy/kserve.yaml by kind."""
    docs = [
        d
        for name in ("kubernetes.yaml", "kserve.yaml")
        for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text())
    ]
    return {d["kind"]: d for d in docs}


def containers() -> dict[str, dict]:
    """The serving container of the Deployment and of the InferenceService's predictor."""
    docs = manifests()
    [deployment] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    [kserve] = docs["InferenceService"]["spec"]["predictor"]["containers"]
    return {"Deployment": deployment, "InferenceService": kserve}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity (`1280Mi`, `1Gi`, `2G`) in MiB."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20, "": 1 / 2**20}
    return float(number) * units[unit]


def dockerfile_default(name: str) -> str:
    """The default of a build argument, the same in every stage that declares it."""
    [value] = set(re.findall(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE))
    return value


def dockerfile_cmd() -> list[str]:
    return json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.MULTILINE).group(1))


@contextmanager
def serving(command: Path, model: Path, args: list[str], environment: dict, log: Path) -> Iterator[str]:
    """`command serve model` with a manifest's `args`, on a free loopback port instead of its host and port.

    Yields:
        The server's URL, once /readyz answers 200; the server is stopped afterwards.
    """
    args = list(args)
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port := free_port())
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(command), "serve", str(model), *args], env=environment, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"server not ready in {seconds} s"
        time.sleep(0.2)


def test_the_model_path_is_one_variable_the_dockerfile_the_manifests_and_the_docs_agree_on():
    model = dockerfile_default("MODEL")
    assert "CNNCODES_MODEL=/models/${MODEL}" in DOCKERFILE
    assert re.search(r'^ENTRYPOINT \[.*exec cnncodes serve \\"\$CNNCODES_MODEL\\"', DOCKERFILE, re.MULTILINE)
    for kind, container in containers().items():
        assert env(container)["CNNCODES_MODEL"] == f"/models/{model}", kind
        assert "command" not in container, f"{kind} must keep the image's entrypoint, which serves $CNNCODES_MODEL"
        assert not any(a.endswith((".joblib", ".keras")) for a in container["args"]), kind
    built = re.findall(r"--build-arg MODEL=(\S+)", (ROOT / "docs" / "deployment.md").read_text())
    assert built and set(built) == {model}


def test_the_runtime_stage_installs_no_tensorflow_and_its_pins_are_pyprojects():
    runtime = DOCKERFILE[DOCKERFILE.index(" AS runtime") :]
    assert "serve-runtime.txt" in runtime and "--no-deps" in runtime and "COPY --from=build" in runtime
    assert "cnncodes prepare" in DOCKERFILE[: DOCKERFILE.index(" AS runtime")] and "prepare" not in runtime
    assert "CNNCODES_WEIGHTS_DIR" not in runtime and "USER 10001" in runtime
    pinned = dict(re.match(r"([A-Za-z0-9_-]+)(.*)", r).groups() for r in serve_runtime())
    assert not set(pinned) & set(CONVERTERS)
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["serve"]
    declared_pins = dict(re.match(r"([A-Za-z0-9_-]+)(?:\[.*\])?(.*)", r).groups() for r in declared)
    assert {name: declared_pins.get(name) for name in pinned} == pinned


def serve_runtime() -> list[str]:
    lines = (ROOT / "deploy" / "serve-runtime.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_memory_limits_hold_the_measured_peak_of_the_default_model_at_their_max_batch():
    measured = json.loads((ROOT / "deploy" / "serve-memory.json").read_text())
    default_sizes = list(get_backbone("mobilenetv2").code_sizes)
    rows = {r["max_batch"]: r for r in measured["rows"] if r["input_sizes"] == default_sizes}
    cmd = dockerfile_cmd()
    for kind, container in containers().items():
        max_batch = int(option(container["args"], "--max-batch"))
        assert max_batch == int(option(cmd, "--max-batch")), f"{kind} and the Dockerfile serve other batches"
        assert max_batch in rows, f"no measured peak of the default model at --max-batch {max_batch}"
        limit, request = (mebibytes(container["resources"][k]["memory"]) for k in ("limits", "requests"))
        assert limit >= HEADROOM * rows[max_batch]["peak_rss_mib"], kind
        assert request >= rows[max_batch]["rss_after_warm_up_mib"], kind
        assert option(container["args"], "--threads") == container["resources"]["limits"]["cpu"]
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    for row in measured["rows"]:  # the docs show the measurement the test holds the manifests to
        assert f"| {row['max_batch']} | {row['rss_after_warm_up_mib']} | {row['peak_rss_mib']} |" in deployment
    assert f"Measured on {measured['date']}" in deployment
    batches = " ".join(str(b) for b in dict.fromkeys(r["max_batch"] for r in measured["rows"]))
    assert re.search(rf"python scripts/bench_serve_memory\.py [^`]*--max-batch {batches}", deployment)


def test_the_manifests_probes_ports_and_options_answer_on_a_live_server(served):
    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["minAvailable"] < docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    kserve = docs["InferenceService"]
    assert env(containers()["InferenceService"])["PROTOCOL"] == "v2"
    annotated = {"Deployment": pod["metadata"]["annotations"], "InferenceService": kserve["metadata"]["annotations"]}
    assert f"EXPOSE {option(dockerfile_cmd(), '--port')}" in DOCKERFILE
    probes = {}
    for kind, container in containers().items():
        [port] = container["ports"]
        args = container["args"]
        assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == str(port["containerPort"])
        assert annotated[kind]["prometheus.io/scrape"] == "true"
        assert annotated[kind]["prometheus.io/port"] == str(port["containerPort"])
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probes[kind, name] = container[name]["httpGet"]["path"]
            assert container[name]["httpGet"]["port"] in (port["containerPort"], port.get("name")), (kind, name)
    # one server answers for both: their options differ only in the port and the model's name in the V2 paths
    deployment, kserve_args = (options(c["args"]) for c in containers().values())
    assert deployment | {"--port": kserve_args["--port"], "--model-name": kserve_args["--model-name"]} == kserve_args
    assert options(dockerfile_cmd()).items() <= deployment.items()
    healthcheck = re.search(r"http://127\.0\.0\.1:\d+(/\w+)", DOCKERFILE).group(1)
    args = containers()["InferenceService"]["args"]
    with serving(CNNCODES, served["model"], args, served["env"], served["root"] / "manifests.log") as url:
        for (kind, name), path in probes.items():
            assert httpx.get(url + path).status_code == 200, (kind, name, path)
        for path in {a["prometheus.io/path"] for a in annotated.values()}:
            metrics = httpx.get(url + path)
            assert metrics.status_code == 200 and "process_resident_memory_bytes" in metrics.text
        assert httpx.get(f"{url}/v2/models/{kserve_args['--model-name']}/ready").status_code == 200
        assert httpx.get(url + healthcheck).status_code == 200
        answer = httpx.post(f"{url}/predict", files=upload(served["images"][:2]))
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2


def options(args: list[str]) -> dict[str, str | bool]:
    """Command-line options as a dict: each flag's value, or True for a flag that takes none."""
    found: dict[str, str | bool] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
            found[arg] = value
    return found


def test_a_prepared_model_loads_where_no_converter_is_installed_and_an_unprepared_one_says_where_to_prepare(
    served, monkeypatch, tmp_path
):
    pixels = np.stack([load_predictor(served["model"]).pixels(p) for p in served["images"][:3]])
    expected = load_predictor(served["model"]).probabilities(pixels)
    installed = runners.package_versions()
    without = {k: v for k, v in installed.items() if k not in CONVERTERS}
    monkeypatch.setattr(runners, "package_versions", lambda: without)  # a serve-only install: ONNX Runtime alone
    assert runners.onnx_cache_path(ExtractorSpec.from_dict(served_extractor(served)).network_key).is_file()
    assert np.allclose(load_predictor(served["model"]).probabilities(pixels), expected, atol=1e-6)

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "empty"))
    result = cli("prepare", served["model"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert "run `cnncodes prepare`" in line and "TensorFlow is not installed" in line
    assert not list((tmp_path / "empty").rglob("*.onnx")) and not list((tmp_path / "empty").rglob("*.failed"))


def served_extractor(served: dict) -> dict:
    from cnncodes.runs.bundle import load_bundle

    return load_bundle(served["model"])[1]["extractor"]


# --- a serve-only environment, as the Dockerfile's runtime stage builds it ------------------------------------------


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def serve_only(tmp_path_factory) -> Path:
    """A virtual environment with deploy/serve-runtime.txt and the package (--no-deps): no TensorFlow, no Keras.

    Built once per test run (both xdist workers share it), at the versions of this environment's packages.
    """
    if not pypi_reachable():
        pytest.skip("PyPI is unreachable: the serve-only environment cannot be installed")
    base = session_root(tmp_path_factory) / "serve-only"
    venv = base / "venv"
    with run_lock(base.with_suffix(".lock")):
        if not (venv / "built").is_file():
            shutil.rmtree(base, ignore_errors=True)
            package = base / "package"
            shutil.copytree(ROOT / "src", package / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            for name in ("pyproject.toml", "README.md"):
                shutil.copy(ROOT / name, package / name)
            frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
            (base / "constraints.txt").write_text(
                "\n".join(line for line in frozen.stdout.splitlines() if "==" in line and "cnncodes" not in line)
            )
            uv = [sys.executable, "-m", "uv"]  # pip's resolver and installer, 15x faster: the same packages
            subprocess.run([*uv, "venv", "-q", str(venv)], check=True)
            pip = [*uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
            constrained = [*pip, "-c", str(base / "constraints.txt")]
            subprocess.run([*constrained, "-r", str(ROOT / "deploy" / "serve-runtime.txt")], check=True)
            subprocess.run([*pip, "--no-deps", str(package)], check=True)
            (venv / "built").touch()
    return venv


@pytest.fixture(scope="session")
def imagenet_bundle(tmp_path_factory) -> dict:
    """A MobileNetV2 (ImageNet weights, 96 px) logreg bundle, prepared, then its weights file deleted.

    Made with a copy of the weights, which is gone afterwards: nothing can find a weights file any more.
    """
    root = tmp_path_factory.mktemp("imagenet-bundle")
    weights = root / "weights"
    weights.mkdir()
    shutil.copy(MOBILENET_WEIGHTS, weights)
    data = make_dataset(root / "data", per_class=4, size=64)
    cache = str(session_root(tmp_path_factory) / "cnncodes_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNCODES_CACHE_DIR", cache)
        mp.setenv("CNNCODES_WEIGHTS_DIR", str(weights))
        mp.setenv("KERAS_HOME", str(root / "keras_home"))  # no weights Keras may have downloaded before
        spec = ExtractorSpec.create(backbone="mobilenetv2", image_size=96)
        cnncodes.extract(data, root / "features", spec, progress=False)
        fitted = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "logreg", "--cv", 2)
        assert fitted.exit_code == 0, fitted.output
        model = root / "models" / "mobilenetv2-out_relu-logreg.joblib"
        assert cli("prepare", model).exit_code == 0
        shutil.rmtree(weights)
        images = sorted(data.rglob("*.*"))[::3]
        # the full install, with no weights file left anywhere: the prepared model alone
        predicted = cnncodes.predict(model, images, top_k=3, progress=False)
        expected = {path.name: prediction.top_k for path, prediction in zip(images, predicted)}
    return {"model": model, "images": images, "expected": expected, "cache": cache}


@pytest.mark.slow
def test_a_prepared_model_serves_in_an_environment_without_tensorflow_the_same_probabilities(
    serve_only, imagenet_bundle, tmp_path
):
    python = serve_only / "bin" / "python"
    for converter in ("tensorflow", "keras", "tf2onnx"):
        assert subprocess.run([str(python), "-c", f"import {converter}"], capture_output=True).returncode != 0
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CNNCODES_CACHE_DIR": imagenet_bundle["cache"]}
    args = containers()["Deployment"]["args"]  # the container's own options
    with serving(serve_only / "bin" / "cnncodes", imagenet_bundle["model"], args, environment, tmp_path / "log") as url:
        answer = httpx.post(f"{url}/predict", files=upload(imagenet_bundle["images"]), params={"top_k": 3})
        assert answer.status_code == 200, answer.text
        for got in answer.json()["predictions"]:
            want = imagenet_bundle["expected"][got["filename"]]
            assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want]
            assert np.allclose([t["probability"] for t in got["top_k"]], [t["probability"] for t in want], atol=1e-5)

    unprepared = {**environment, "CNNCODES_CACHE_DIR": str(tmp_path / "empty-cache")}
    run = subprocess.run(
        [str(serve_only / "bin" / "cnncodes"), "serve", str(imagenet_bundle["model"])],
        env=unprepared,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    [line] = (run.stdout + run.stderr).strip().splitlines()
    assert "run `cnncodes prepare`" in line and "where TensorFlow is installed" in line
