"""The search page: its JSON API in process, and the page in headless Chromium.

The index holds 12 seeded images of three colour classes encoded by a tiny
exported model; the expected ranking is brute force over the same model's
codes (stable on distance, then index order).
"""

import io
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import hostile_inputs
import http_fixtures
import model_fixtures
from uhga_tf import child_process
from uhga_tf import codes as codes_lib
from uhga_tf import retrieval
from uhga_tf import saved_model
from uhga_tf.retrieval import web

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_LENGTH = 24
CLASSES = {"red": (210, 50, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}
TOP_K = 6
TIMEOUT = 30


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_web")
    models = model_fixtures.tiny_models(CODE_LENGTH, seed=0)
    model_dir = saved_model.export_saved_model(
        *models, str(root / "models"), image_size=model_fixtures.IMAGE_SIZE
    )
    rng = np.random.default_rng(0)
    paths = []
    for name, rgb in CLASSES.items():
        for i in range(4):
            size = 40 + 4 * i
            ramp = np.linspace(-60, 60, size)[None, :, None] * rng.uniform(
                -1, 1, 3
            )
            noise = rng.normal(0, 25, size=(size, size, 3))
            pixels = np.clip(np.asarray(rgb) + ramp + noise, 0, 255)
            path = root / "images" / name / f"{name}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            paths.append(str(path))
    index_dir = str(root / "index")
    retrieval.build_index(
        model_dir, index_dir, images_dir=str(root / "images"),
        batch_size=4, progress=False,
    )  # fmt: skip
    return root, model_dir, index_dir


def expected_ranking(model_dir, index_dir, query_bytes, top_k):
    """(ids, distances, labels) by brute force over the model's codes."""
    index = retrieval.HammingIndex.load(index_dir)
    encode = tf.saved_model.load(model_dir).signatures["serving_default"]
    sources = [m["source"] for m in index.get_metadata(index.ids)]
    database = encode(
        image_bytes=tf.constant([open(p, "rb").read() for p in sources])
    )["codes"].numpy()
    query = encode(image_bytes=tf.constant([query_bytes]))["codes"].numpy()
    distances = codes_lib.hamming_distance(query, database)[0]
    order = np.argsort(distances, kind="stable")[:top_k]
    labels = [os.path.basename(os.path.dirname(sources[i])) for i in order]
    return index.ids[order].tolist(), distances[order].tolist(), labels


@pytest.fixture(scope="module")
def page(workspace):
    _, model_dir, index_dir = workspace
    service = web.SearchService(
        index_dir,
        model_dir=model_dir,
        config=web.WebConfig(port=0, top_k=TOP_K, max_upload_bytes=200_000,
                             max_pixels=100_000),
    )  # fmt: skip
    server = web.SearchWebServer(service)
    port = server.start()
    yield port
    server.stop()


def call(port, method, path, body=None):
    return http_fixtures.http_call(port, method, path, body, timeout=TIMEOUT)


def test_upload_and_item_search_match_brute_force(workspace, page):
    root, model_dir, index_dir = workspace
    query = (root / "images" / "green" / "green_2.png").read_bytes()
    status, answer = call(page, "POST", "/api/search", query)
    assert status == 200, answer
    ids, distances, labels = expected_ranking(
        model_dir, index_dir, query, TOP_K
    )
    assert [r["id"] for r in answer["results"]] == ids
    assert [r["distance"] for r in answer["results"]] == distances
    assert [r["label"] for r in answer["results"]] == labels
    assert [r["rank"] for r in answer["results"]] == list(range(1, 7))
    assert distances[0] == 0 and answer["code_length"] == CODE_LENGTH
    # Searching from an item starts with that item (or a tie) at 0.
    first = answer["results"][0]
    status, again = call(page, "GET", f"/api/search?id={first['id']}&top_k=3")
    assert status == 200, again
    assert again["query"]["id"] == first["id"]
    assert again["query"]["label"] == first["label"]
    assert [r["distance"] for r in again["results"]][0] == 0
    assert len(again["results"]) == 3
    status, png = call(page, "GET", first["image"])
    assert status == 200 and png.startswith(b"\x89PNG")
    status, html = call(page, "GET", "/")
    assert status == 200 and b'id="file"' in html
    assert b"http://" not in html and b"https://" not in html  # no CDN


def _png_claiming(width, height):
    """A PNG whose header claims width x height (the data is 1x1)."""
    out = io.BytesIO()
    Image.new("RGB", (1, 1)).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(
    "method,path,body,status,words",
    [
        ("POST", "/api/search", b"x" * 200_001, 413, ["max_upload_bytes"]),
        ("POST", "/api/search", _png_claiming(1000, 1000), 413,
         ["1000x1000", "max_pixels=100000"]),
        ("POST", "/api/search", b"GIF89a but not really", 400,
         ["not a well-formed GIF"]),
        # issue 18: what PIL's or the header's size understates.
        ("POST", "/api/search", hostile_inputs.jpeg_with_junk_before_sof(
            300, 200), 400, ["not a well-formed JPEG", "header"]),
        ("POST", "/api/search", hostile_inputs.animated_gif(100, 100, 20),
         413, ["20 frames", "200000 pixels", "max_pixels=100000"]),
        ("POST", "/api/search", hostile_inputs.gif_frame_over_canvas(
            (10, 10), (400, 300)), 413, ["120000 pixels"]),
        ("POST", "/api/search", hostile_inputs.one_bit_bmp(), 400,
         ["cannot be decoded", "channels"]),
        ("POST", "/api/search?top_k=0", _png_claiming(1, 1), 400, ["top_k"]),
        ("GET", "/api/search?id=999", None, 404, ["999"]),
        ("GET", "/api/search?id=x", None, 400, ["id must be an integer"]),
        ("GET", "/image/999", None, 404, ["999"]),
        ("GET", "/etc/passwd", None, 404, ["no page"]),
    ],  # fmt: skip
)
def test_bad_requests(page, method, path, body, status, words):
    code, answer = call(page, method, path, body)
    assert code == status, answer
    for word in words:
        assert word in answer["error"], answer
    # The page keeps serving.
    assert call(page, "GET", "/")[0] == 200


def _chromium():
    for browser in ("chromium", "chromium-browser"):
        path = shutil.which(browser)
        if path:
            return path, shutil.which("chromedriver")
    return None, None


@pytest.mark.slow
def _start_search_page(index_dir, model_dir, tmp_path,
                       command=("uhga_tf.search_page",)):
    """Run the search page on a free port; return (process, url)."""
    out_path, log_path = tmp_path / "page.out", tmp_path / "page.log"
    proc = child_process.start(
        [*command, f"--index={index_dir}", f"--model={model_dir}",
         "--port=0", f"--top_k={TOP_K}"],
        out_path, log_path, cwd=REPO, env={"CUDA_VISIBLE_DEVICES": ""})
    return proc, child_process.wait_for_output(
        proc, out_path, log_path, child_process.page_url, 90)


def _headless_chrome(webdriver, browser, driver_path):
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--window-size=1000,760"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=driver_path),
        options=options,
    )
    driver.set_page_load_timeout(TIMEOUT)
    return driver


def _check_upload_and_click(driver, url, workspace, tmp_path):
    """Upload an image, check the first tile and click the third."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, model_dir, index_dir = workspace
    driver.get(url)
    query_path = root / "images" / "blue" / "blue_1.png"
    driver.find_element(By.ID, "file").send_keys(str(query_path))
    wait = WebDriverWait(driver, TIMEOUT)
    wait.until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".tile")) == TOP_K
        and all(
            img.get_property("naturalWidth") > 0
            for img in d.find_elements(By.CSS_SELECTOR, ".tile img")
        )
    )
    _, distances, labels = expected_ranking(
        model_dir, index_dir, query_path.read_bytes(), TOP_K
    )
    tiles = driver.find_elements(By.CSS_SELECTOR, ".tile")
    assert len(tiles) == TOP_K
    first = tiles[0]
    assert first.find_element(By.CLASS_NAME, "label").text == labels[0]
    assert first.find_element(By.CLASS_NAME, "distance").text == (
        f"#1 · d = {distances[0]}"
    )
    assert labels[0] == "blue" and distances[0] == 0
    # The README's picture comes from docs/page_screenshot.py (real
    # images, the demo's model); this one only proves the page renders.
    screenshot = tmp_path / "search_page.png"
    driver.save_screenshot(str(screenshot))
    assert Image.open(screenshot).size[0] > 0
    # Clicking a result searches from that item.
    item_id = tiles[2].get_attribute("data-id")
    tiles[2].click()
    wait.until(
        lambda d: d.find_element(By.ID, "query-text").text.startswith(
            f"item {item_id} "
        )
    )
    assert len(driver.find_elements(By.CSS_SELECTOR, ".tile")) == TOP_K


def test_page_in_headless_chromium(workspace, tmp_path):
    """Upload an image in the browser, check tiles, click a result."""
    browser, driver_path = _chromium()
    if browser is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(Debian: chromium chromium-driver)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver")

    _, model_dir, index_dir = workspace
    proc, url = _start_search_page(index_dir, model_dir, tmp_path)
    driver = None
    try:
        assert url and url.startswith("http://127.0.0.1:"), url
        driver = _headless_chrome(webdriver, browser, driver_path)
        _check_upload_and_click(driver, url, workspace, tmp_path)
    finally:
        if driver is not None:
            driver.quit()
        child_process.stop(proc)
    assert proc.returncode == 0, (tmp_path / "page.log").read_text()[-2000:]


@pytest.mark.slow
def test_search_serve_still_starts_the_page_with_a_notice(workspace,
                                                          tmp_path):
    """The old `search serve` spelling runs `search_page` for one release."""
    _, model_dir, index_dir = workspace
    proc, url = _start_search_page(index_dir, model_dir, tmp_path,
                                   command=("uhga_tf.search", "serve"))
    try:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        status, body = call(port, "GET", "/")
        assert status == 200 and b"<html" in body.lower()
    finally:
        child_process.stop(proc)
    assert proc.returncode == 0
    notice = (
        "uhga_tf: `python -m uhga_tf.search serve` is deprecated and goes "
        "in the next release; use `python -m uhga_tf.search_page` "
        "(same flags)"
    )
    assert notice in (tmp_path / "page.log").read_text().splitlines()


# issue 18: every upload answered -----------------------------------------


def test_pil_bomb_is_refused_not_dropped():
    """An upload PIL refuses as a bomb (the page's own limit set high)
    is a SearchError, not a DecompressionBombError that drops the
    connection."""
    import types

    fake = types.SimpleNamespace(
        config=web.WebConfig(max_upload_bytes=10**6, max_pixels=10**10))
    with pytest.raises(web.SearchError) as info:
        web.SearchService.check_upload(fake, _png_claiming(20000, 20000))
    assert info.value.status == 400
    assert "not an image" in info.value.message


def test_model_and_index_code_lengths_must_agree(workspace, tmp_path):
    """The page started with a 16-bit model over a 24-bit index and then
    failed every upload."""
    _, _, index_dir = workspace
    models = model_fixtures.tiny_models(16, seed=0)
    model_dir = saved_model.export_saved_model(
        *models, str(tmp_path / "models"),
        image_size=model_fixtures.IMAGE_SIZE)
    with pytest.raises(ValueError, match="emits 16-bit codes; the index "
                                         "holds 24-bit codes"):
        web.SearchService(index_dir, model_dir=model_dir)


def test_server_refusal_is_a_400_with_its_message(workspace):
    """With --server=, a gRPC refusal was an unanswered upload."""
    from uhga_tf.serving import server as server_lib

    root, _, index_dir = workspace
    server = server_lib.ModelServer(server_lib.ServerConfig(
        model_base_path=str(root / "models"), port=0,
        max_image_pixels=9000))  # warm-ups (<= 3840 px) load
    port = server.start()
    try:
        service = web.SearchService(
            index_dir, server=f"127.0.0.1:{port}",
            config=web.WebConfig(max_pixels=100_000))
        buffer = io.BytesIO()
        Image.new("RGB", (100, 100), (200, 40, 40)).save(buffer, "PNG")
        upload = buffer.getvalue()
        with pytest.raises(web.SearchError) as info:
            service.search_upload(upload)
        assert info.value.status == 400
        assert "INVALID_ARGUMENT" in info.value.message
        assert "max_image_pixels=9000" in info.value.message
    finally:
        server.stop(1.0)
