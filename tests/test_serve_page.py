"""`cnncodes serve` for people and behind a key: the page at /, POST /explain, the API key and CORS.

One live server (an untrained VGG16 at 32 px cut at block3_pool, whose maps are 4×4) started with an
API key file and one allowed origin; the page is driven in a real headless Chromium through Selenium.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import cnncodes
from cnncodes.explain.explainers import Explanation
from cnncodes.serving import heatmap

from .helpers import cli, fake_app, fast_spec, in_process, make_dataset, running_server, session_root, write_image

KEY = "s3cret-token-0123456789abcdef"
ALLOWED = "http://allowed.example:8080"
CHROMEDRIVER = shutil.which("chromedriver")
BROWSER = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory) -> Iterator[dict]:
    """A server of a small bundle with an API key and one CORS origin, its model and a test image."""
    base = session_root(tmp_path_factory)
    env = {**os.environ, "CNNCODES_CACHE_DIR": str(base / "cnncodes_cache"), "KERAS_HOME": str(base / "keras_home")}
    env.pop("CNNCODES_API_KEY", None)
    root = tmp_path_factory.mktemp("serve_page")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("CNNCODES_CACHE_DIR", "KERAS_HOME"):
            mp.setenv(name, env[name])
        data = make_dataset(root / "data", per_class=4, size=48)
        cnncodes.extract(data, root / "features", fast_spec(layer="block3_pool"), progress=False)
        fitted = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "logreg", "--cv", 2)
        assert fitted.exit_code == 0, fitted.output
    (model,) = (root / "models").glob("*.joblib")
    key_file = root / "key.txt"
    key_file.write_text(KEY + "\n")
    served = {"root": root, "model": model, "env": env}
    with running_server(served, "--api-key-file", str(key_file), "--cors-origin", ALLOWED) as (url, proc):
        image = write_image(root / "upload" / "stripes.png", "stripes", seed=7, size=96)
        yield {"url": url, "proc": proc, "model": model, "image": image, "root": root, "env": env}


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.slow  # the module's server: an extraction, a fit and two conversions, once
def test_inference_routes_need_the_key_and_probes_metrics_and_the_page_do_not(page_server):
    url, image = page_server["url"], page_server["image"].read_bytes()
    png = {"Content-Type": "image/png"}
    for path in ("/predict", "/explain", "/v2/models/vgg16/infer"):
        missing = httpx.post(f"{url}{path}", content=image, headers=png)
        assert missing.status_code == 401, path
        assert missing.headers["WWW-Authenticate"] == 'Bearer realm="cnncodes"'
        assert "API key" in missing.text
        wrong = httpx.post(f"{url}{path}", content=image, headers={**png, **bearer("s3cret-token-0123456789abcdeX")})
        assert wrong.status_code == 401, path
        assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    assert "error" in httpx.post(f"{url}/v2/models/vgg16/infer", content=image).json()  # V2's error form
    assert httpx.get(f"{url}/metadata").status_code == 401
    assert httpx.post(f"{url}/predict", content=image, headers={**png, **bearer()}).status_code == 200
    assert httpx.post(f"{url}/predict", content=image, headers={**png, "X-API-Key": KEY}).status_code == 200
    assert httpx.post(
        f"{url}/predict", content=image, headers={**png, "Authorization": f"Basic {KEY}"}
    ).status_code == (401)
    for path in ("/", "/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


@pytest.mark.slow
def test_cors_allows_the_listed_origin_only_and_its_pages_can_read_a_401(page_server):
    url = page_server["url"]
    asked = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{url}/predict", headers={"Origin": ALLOWED, **asked})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "authorization" in allowed.headers["Access-Control-Allow-Headers"].lower()
    other = httpx.options(f"{url}/predict", headers={"Origin": "http://evil.example", **asked})
    assert other.status_code == 400
    assert "Access-Control-Allow-Origin" not in other.headers
    refused = httpx.post(f"{url}/predict", content=b"x", headers={"Origin": ALLOWED})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "www-authenticate" in refused.headers["Access-Control-Expose-Headers"].lower()


@pytest.mark.slow
def test_explain_answers_predict_s_classes_with_a_map_and_an_overlay_and_loads_no_tensorflow(page_server):
    url, image = page_server["url"], page_server["image"]
    files = {"files": (image.name, image.read_bytes(), "image/png")}
    explained = httpx.post(f"{url}/explain", params={"top_k": 3}, files=files, headers=bearer(), timeout=120)
    assert explained.status_code == 200, explained.text
    body = explained.json()
    predicted = httpx.post(f"{url}/predict", params={"top_k": 3}, files=files, headers=bearer()).json()
    assert [t["label"] for t in body["top_k"]] == [t["label"] for t in predicted["predictions"][0]["top_k"]]
    np.testing.assert_allclose(
        [t["probability"] for t in body["top_k"]],
        [t["probability"] for t in predicted["predictions"][0]["top_k"]],
        atol=1e-4,
    )
    assert body["explained"]["label"] == body["label"]
    assert body["method"] == "cam"  # logistic regression on average-pooled maps
    assert np.array(body["map"], dtype=float).shape == (4, 4)
    header, encoded = body["overlay"].split(",", 1)
    assert header == "data:image/png;base64"
    overlay = Image.open(io.BytesIO(base64.b64decode(encoded)))
    assert overlay.format == "PNG" and overlay.width >= 96
    other = next(c for c in ("circles", "squares", "stripes") if c != body["label"])
    chosen = httpx.post(f"{url}/explain", params={"label": other}, files=files, headers=bearer(), timeout=60).json()
    assert chosen["explained"]["label"] == other
    assert chosen["map"] != body["map"]
    maps = Path(f"/proc/{page_server['proc'].pid}/maps").read_text()
    assert "tensorflow" not in maps.lower()  # the server explains bundles through ONNX Runtime


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "params", "status", "reason"),
    [
        (b"this is not an image", {}, 400, "not an image"),
        (b"", {}, 400, "empty"),
        (None, {}, 400, "one image per request"),
        (b"png", {"label": "no-such-class"}, 400, "unknown class"),
        (b"png", {"top_k": 0}, 422, "greater than or equal to 1"),
    ],
)
def test_explain_refuses_a_client_s_mistake_with_a_4xx_and_its_reason(page_server, body, params, status, reason):
    url, image = page_server["url"], page_server["image"].read_bytes()
    if body is None:
        sent = {"files": [("files", ("a.png", image, "image/png")), ("files", ("b.png", image, "image/png"))]}
    else:
        sent = {"content": image if body == b"png" else body, "headers": {"Content-Type": "application/octet-stream"}}
    headers = {**sent.pop("headers", {}), **bearer()}
    answer = httpx.post(f"{url}/explain", params=params, headers=headers, timeout=60, **sent)
    assert answer.status_code == status, answer.text
    assert reason in answer.text


def test_explain_keeps_predict_s_body_limit_and_content_types():
    app = fake_app(lambda pixels: np.tile([0.25, 0.75], (len(pixels), 1)), max_bytes=1000)

    async def calls(client):
        big = await client.post("/explain", content=b"x" * 5000, headers={"Content-Type": "image/png"})
        text = await client.post("/explain", content=b"hello", headers={"Content-Type": "text/plain"})
        return big, text

    big, text = in_process(app, calls)
    assert big.status_code == 413
    assert text.status_code == 415
    assert "multipart/form-data" in text.json()["detail"]


def test_the_key_may_come_from_the_environment_and_no_explain_says_why_there_is_no_map(monkeypatch):
    monkeypatch.setenv("CNNCODES_API_KEY", KEY)
    app = fake_app(lambda pixels: np.tile([0.25, 0.75], (len(pixels), 1)), explain=False)
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 10, 200)).save(png, "PNG")

    async def calls(client):
        sent = {"content": png.getvalue(), "headers": {"Content-Type": "image/png"}}
        no_key = await client.post("/predict", **sent)
        keyed = await client.post("/predict", content=sent["content"], headers={**sent["headers"], "X-API-Key": KEY})
        no_map = await client.post("/explain", content=sent["content"], headers={**sent["headers"], **bearer()})
        return no_key, keyed, no_map

    no_key, keyed, no_map = in_process(app, calls)
    assert no_key.status_code == 401
    assert keyed.json()["predictions"][0]["label"] == "b"
    assert no_map.status_code == 501
    assert "--no-explain" in no_map.json()["detail"]


class BlockedExplainer:
    """An explainer of fake_app's two classes whose maps wait for `release`: explanations pile up."""

    classes, image_size, resize, record = ["a", "b"], 32, "crop", {"run": "fake"}

    def __init__(self):
        self.release = threading.Event()

    def explain(self, pixels, choose):
        self.release.wait(30)
        proba = np.tile([0.25, 0.75], (len(pixels), 1))
        explained = choose(proba)
        maps = np.ones((len(pixels), 2, 2, explained.shape[1]))
        return Explanation(proba, explained, maps, np.zeros(explained.shape), "cam")


def test_explanations_run_one_at_a_time_and_a_full_queue_is_a_503_with_retry_after(monkeypatch):
    blocked = BlockedExplainer()
    monkeypatch.setattr(heatmap, "load_explainer", lambda *args: blocked)
    app = fake_app(lambda pixels: np.tile([0.25, 0.75], (len(pixels), 1)))
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 10, 200)).save(png, "PNG")

    async def calls(client):
        sent = [
            asyncio.create_task(client.post("/explain", content=png.getvalue(), headers={"Content-Type": "image/png"}))
            for _ in range(heatmap.EXPLAIN_WAITING + 3)
        ]
        await asyncio.sleep(1)
        refused = [task.result() for task in sent if task.done()]
        blocked.release.set()
        return refused, await asyncio.gather(*sent)

    refused, answers = in_process(app, calls)
    assert [a.status_code for a in refused] == [503, 503]
    assert all(a.headers["Retry-After"] == "1" for a in refused)
    assert sorted(a.status_code for a in answers) == [200] * (heatmap.EXPLAIN_WAITING + 1) + [503, 503]
    assert answers[0].json()["explained"] == {"label": "b", "probability": 0.75}


def test_a_model_whose_explainer_cannot_load_answers_501_with_the_reason_and_predictions_still_work(monkeypatch):
    tries = []

    def no_tensorflow(*args):
        tries.append(args)
        raise ImportError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(heatmap, "load_explainer", no_tensorflow)
    app = fake_app(lambda pixels: np.tile([0.25, 0.75], (len(pixels), 1)))
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 10, 200)).save(png, "PNG")

    async def calls(client):
        sent = {"content": png.getvalue(), "headers": {"Content-Type": "image/png"}}
        return [await client.post(path, **sent) for path in ("/explain", "/explain", "/predict")]

    first, again, predicted = in_process(app, calls)
    assert first.status_code == again.status_code == 501
    assert "needs tensorflow, which is not installed here" in first.json()["detail"]
    assert len(tries) == 1  # the reason is kept, not tried again on every request
    assert predicted.json()["predictions"][0]["label"] == "b"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key-file", "missing.txt"], "cannot read the API key file"),
        (["--api-key-file", "empty.txt"], "is empty"),
        (["--cors-origin", "https://example.org/"], "is not an origin"),
        (["--cors-origin", "example.org"], "is not an origin"),
    ],
)
def test_serve_refuses_an_unusable_key_file_or_origin_before_loading_the_model(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_text("\n")
    result = cli("serve", tmp_path / "absent.joblib", "--port", "0", *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.slow
@pytest.mark.skipif(
    (BROWSER is None or CHROMEDRIVER is None) and not os.environ.get("CI"),  # CI installs them: there, a failure
    reason="no chromium and chromium-driver on PATH (CI installs them: .ci/run; apt-get install chromium-driver)",
)
def test_in_a_browser_the_page_takes_the_key_and_images_and_shows_predict_s_labels_and_heat_maps(page_server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if BROWSER is None or CHROMEDRIVER is None:
        pytest.fail("CI: no chromium or chromedriver on PATH, although .ci/run installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.get(page_server["url"] + "/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "needs an API key" in d.find_element(By.ID, "key-status").text)
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "save-key").click()
        wait.until(lambda d: d.find_element(By.ID, "key-status").text == "key accepted")
        images = [page_server["image"], write_image(page_server["root"] / "upload" / "circles.jpg", "circles", 9, 80)]
        driver.find_element(By.ID, "files").send_keys("\n".join(map(str, images)))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]")) == 2)
        loaded = "return [...document.querySelectorAll('img.heatmap')].filter(i => i.complete && i.naturalWidth).length"
        wait.until(lambda d: d.execute_script(loaded) == 2)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        shown = {
            c.find_element(By.CSS_SELECTOR, ".file").text: c.find_element(By.CSS_SELECTOR, ".label").text for c in cards
        }
        bars = [len(c.find_elements(By.CSS_SELECTOR, ".top li")) for c in cards]
        logs = [  # the 401 of the page's first look at /metadata, before the key, is expected
            entry
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "401 (Unauthorized)" not in entry["message"]
        ]
        screenshot = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    expected = cnncodes.predict(page_server["model"], images, progress=False)
    assert shown == {Path(p.filename).name: p.label for p in expected}
    assert bars == [3, 3]
    assert not logs, logs  # no script error, no request the page's policy blocked
    picture = page_server["root"] / "serve-page.png"
    picture.write_bytes(screenshot)
    assert Image.open(picture).width == 1100
    if os.environ.get("SERVE_PAGE_SCREENSHOT"):  # the docs' picture: SERVE_PAGE_SCREENSHOT=docs/images/serve-page.png
        shutil.copy(picture, os.environ["SERVE_PAGE_SCREENSHOT"])
