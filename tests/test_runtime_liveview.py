"""The live view (`--http`), as an operator uses it: edge-ad running on a video, a real headless browser.

The browser tests take a screenshot of the page while edge-ad runs on frames with a defect and look
for the heatmap's red in the frame and the chart's lines, then draw an inspection region with the
mouse, save it, and check the mask file and that the following decisions use it. The access tests
check that a view beyond loopback needs its token. Chromium, chromedriver and selenium missing: skipped,
or failed under EDGE_AD_REQUIRE=browser (.ci/run).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from prerequisites import missing
from runtime_helpers import bundle_dir, free_port, jsonl, make_frame, run_cli, start_cli, wait_until, write_video  # noqa: F401

DEFECT = (40, 60, 40, 40)  # x, y, w, h in a 256x192 frame: the left part of the picture
TOKEN = "s3cret-view-token"


def _get(url: str, headers: dict | None = None, method: str = "GET", data: bytes | None = None):
    """(status, headers, body) without following redirects or raising on 4xx."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _serving(proc, url: str, headers: dict | None = None) -> None:
    """Wait until the view answers with a first frame decided (or the process died)."""
    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"edge-ad exited {proc.returncode}: {proc.communicate()[1][-2000:]}")
        try:
            status, _, body = _get(url + "/api/state", headers)
        except OSError:
            return False
        return status == 200 and json.loads(body)["last"] is not None
    wait_until(ready, timeout=60, what="the live view with a first frame")


def _stop(proc) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Selenium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("browser", "selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                    else None)
    if not chromium or not chromedriver:
        missing("browser", "chromium or chromedriver is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def defect_video(tmp_path_factory) -> Path:
    """40 s at 25 fps (played with --realtime): a defect in the left part of the picture for 40 frames, then 10
    normal frames, and so on (the score chart goes up and down)."""
    defect, normal = make_frame([DEFECT]), make_frame()
    frames = [defect if i % 50 < 40 else normal for i in range(1000)]
    return write_video(tmp_path_factory.mktemp("video") / "line1.avi", frames)


def _crop(png: bytes, element, driver) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    ratio = driver.execute_script("return window.devicePixelRatio") or 1
    r = element.rect
    x0, y0 = int(r["x"] * ratio), int(r["y"] * ratio)
    return image[y0:y0 + int(r["height"] * ratio), x0:x0 + int(r["width"] * ratio)]


def _reddish(bgr: np.ndarray) -> np.ndarray:
    b, g, r = (bgr[..., i].astype(int) for i in range(3))
    return (r > 150) & (r > g + 40) & (r > b + 40)


def test_page_shows_heatmap_chart_alerts_and_roi_round_trip(browser, bundle_dir, defect_video, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, state = free_port(), tmp_path / "state"
    url = f"http://127.0.0.1:{port}"
    proc = start_cli("--video", defect_video, "--realtime", "--model", bundle_dir, "--http", f"127.0.0.1:{port}",
                     "--device-id", "pc", "--camera-id", "line1", "--snapshots", tmp_path / "snaps",
                     "--jsonl", tmp_path / "events.jsonl", env={"STATE_DIRECTORY": str(state)})
    try:
        _serving(proc, url)
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.execute_script("const i = document.getElementById('frame');"
                                              "return i.complete && i.naturalWidth > 0"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#alerts img"))  # the alert's snapshot
        wait.until(lambda d: d.execute_script("const i = document.querySelector('#alerts img');"
                                              "return i.complete && i.naturalWidth > 0"))
        wait_until(lambda: len(json.loads(_get(url + "/api/state")[2])["history"]) > 25, timeout=20,
                   what="a few seconds of scores")  # normal and defective frames: the score line goes up and down
        shown = "return [document.getElementById('frame').dataset.index, document.getElementById('verdict').textContent]"
        for _ in range(50):  # a screenshot of a frame with the defect in view (4 of 5 frames have it)
            before = browser.execute_script(shown)
            png = browser.get_screenshot_as_png()
            if before == browser.execute_script(shown) and before[1] == "ANOMALOUS":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the page never showed an anomalous frame")
        (tmp_path / "liveview.png").write_bytes(png)
        frame = _crop(png, browser.find_element(By.ID, "frame"), browser)
        assert frame.shape[0] > 100 and frame.shape[1] > 100, frame.shape
        height, width = frame.shape[:2]
        red = _reddish(frame)
        fx, fy, fw, fh = (int(DEFECT[0] * width / 256), int(DEFECT[1] * height / 192), int(DEFECT[2] * width / 256),
                          int(DEFECT[3] * height / 192))
        assert red[fy:fy + fh, fx:fx + fw].mean() > 0.3, "no heatmap red on the defect"
        assert red[:, width // 2:].mean() < 0.01, "heatmap red where the frame is normal"
        chart = _crop(png, browser.find_element(By.ID, "chart"), browser)
        b, g, r = (chart[..., i].astype(int) for i in range(3))
        assert ((r > 200) & (g < 130) & (b < 120)).sum() > 50, "no threshold line in the chart"
        assert ((b > 200) & (r < 130) & (g > 130)).sum() > 20, "no score line in the chart"
        assert "this machine only" in browser.find_element(By.ID, "access").text

        # ROI editor: a rectangle over the right half of the frame, away from the defect
        last = json.loads(_get(url + "/api/state")[2])["last"]
        assert last["anomalous"] is (last["score"] >= 0.5)  # the defect counts before
        browser.find_element(By.ID, "roi-edit").click()
        canvas = browser.find_element(By.ID, "roi-canvas")
        cw, ch = canvas.rect["width"], canvas.rect["height"]
        ActionChains(browser).move_to_element_with_offset(canvas, int(cw * 0.05), int(-ch * 0.4)).click_and_hold() \
            .move_by_offset(int(cw * 0.2), int(ch * 0.4)).move_by_offset(int(cw * 0.2), int(ch * 0.4)).release() \
            .perform()
        browser.find_element(By.ID, "roi-save").click()
        wait.until(lambda d: "saved to" in d.find_element(By.ID, "roi-message").text)
        message = browser.find_element(By.ID, "roi-message").text
        after = int(message.split("frames after ")[1].split()[0])
        mask_file = state / "roi-pc-line1.png"
        assert str(mask_file) in message
        mask = cv2.imread(str(mask_file), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (192, 256)
        assert mask[100, 200] == 255 and mask[30, 150] == 255 and mask[160, 235] == 255, "the rectangle is not inspected"
        assert mask[80, 60] == 0 and mask[100, 100] == 0 and mask[5, 200] == 0, "outside the rectangle is inspected"
        assert not list(state.glob(".*.tmp")), "a temporary mask file was left behind"

        def later():  # a frame with the defect in view, decided after the save
            last = json.loads(_get(url + "/api/state")[2])["last"]
            return last if last["index"] > after + 2 and last["score"] >= 0.5 else None
        for _ in range(5):
            last = wait_until(later, timeout=20, what="defective frames after the ROI was saved", interval=0.02)
            assert last["anomalous"] is False, last  # the defect still scores, but lies outside the region
            time.sleep(0.1)
        assert not [a for a in jsonl(tmp_path / "events.jsonl", "alert") if a["frame_index"] > after + 2]
        wait.until(lambda d: "in force" in d.find_element(By.ID, "frame-info").text)  # the page outlines the region
        browser.save_screenshot(str(tmp_path / "liveview-roi.png"))
    finally:
        err = _stop(proc)
    assert "ROI mask saved by the live view" in err, err[-2000:]

    # the next start with the view picks the saved region up: the same defect raises no alert
    rerun = run_cli("--video", defect_video, "--max-frames", "20", "--model", bundle_dir, "--http", f"127.0.0.1:{port}",
                    "--device-id", "pc", "--camera-id", "line1", "--jsonl", tmp_path / "rerun.jsonl",
                    env={"STATE_DIRECTORY": str(state)})
    assert rerun.returncode == 0, rerun.stderr
    assert "ROI mask from the live view's editor in force" in rerun.stderr
    assert jsonl(tmp_path / "rerun.jsonl", "alert") == []


@pytest.fixture(scope="module")
def protected_view(bundle_dir, defect_video, tmp_path_factory):
    """edge-ad with its view on every interface, protected by a token from the environment."""
    port = free_port()
    proc = start_cli("--video", defect_video, "--realtime", "--model", bundle_dir, "--http", f"0.0.0.0:{port}",
                     "--jsonl", tmp_path_factory.mktemp("events") / "events.jsonl",
                     env={"EDGE_AD_HTTP_TOKEN": TOKEN, "STATE_DIRECTORY": str(tmp_path_factory.mktemp("state"))})
    url = f"http://127.0.0.1:{port}"
    _serving(proc, url, {"Authorization": f"Bearer {TOKEN}"})
    yield url
    _stop(proc)


def test_beyond_loopback_needs_a_token(bundle_dir, defect_video, tmp_path):
    result = run_cli("--video", defect_video, "--model", bundle_dir, "--http", f"0.0.0.0:{free_port()}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-ad: error: --http 0.0.0.0:") and "token" in lines[0], \
        result.stderr
    config = tmp_path / "view.toml"
    config.write_text(f'video = "{defect_video}"\nmodel = "{bundle_dir}"\nhttp = "0.0.0.0:8080"\n')
    result = run_cli("--config", config, "--print-config")
    assert result.returncode == 2 and "needs a token" in result.stderr
    (tmp_path / "token").write_text(TOKEN + "\n")
    config.write_text(config.read_text() + 'http_token_file = "token"\n')
    result = run_cli("--config", config, "--print-config")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["http"] == "0.0.0.0:8080" and shown["http_token_file"] == str(tmp_path / "token")


def test_every_request_needs_the_token(protected_view):
    url = protected_view
    for path in ("/", "/api/info", "/api/state", "/api/frame", "/static/app.js"):
        assert _get(url + path)[0] == 401, path
        assert _get(url + path, {"Authorization": "Bearer wrong-token-0"})[0] == 403, path
        assert _get(url + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
    roi = json.dumps({"width": 256, "height": 192, "polygons": [[[0, 0], [100, 0], [100, 100]]]}).encode()
    assert _get(url + "/api/roi", {"Content-Type": "application/json"}, "POST", roi)[0] == 401
    assert _get(url + "/api/roi", {"Content-Type": "application/json"}, "DELETE")[0] == 401
    assert _get(url + "/api/frame?token=wrong-token-0")[0] == 403
    status, headers, _ = _get(url + "/?token=" + TOKEN)
    assert status == 303 and headers["Location"] == "/" and "HttpOnly" in headers["Set-Cookie"]
    cookie = headers["Set-Cookie"].split(";")[0]
    status, headers, body = _get(url + "/api/frame", {"Cookie": cookie})
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    info = json.loads(_get(url + "/api/info", {"Cookie": cookie})[2])
    assert info["protected"] is True
    assert TOKEN not in cookie and _get(url + "/api/info", {"Cookie": f"edge_ad_token={TOKEN}x"})[0] == 403


def test_page_says_it_is_token_protected(browser, protected_view):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.delete_all_cookies()
    browser.get(protected_view + "/")
    assert "token-protected" in browser.find_element(By.TAG_NAME, "body").text  # the 401 page explains
    browser.get(protected_view + "/?token=" + TOKEN)  # sets the cookie, then the page loads without it in the URL
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "access").text == "token-protected")
    assert "token" not in browser.current_url
    WebDriverWait(browser, 20).until(lambda d: d.execute_script(
        "const i = document.getElementById('frame'); return i.complete && i.naturalWidth > 0"))


def test_roi_editor_validates_and_writes_atomically(tmp_path):
    """In-process: bad polygons are refused; a saved mask is the next decision's ROI; clearing undoes it."""
    from edge_ad.decide.scoring import Scorer
    from edge_ad.model.bundle import Thresholds
    from edge_ad.view.roi_editor import RoiEditor

    scorer = Scorer(Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5))
    editor = RoiEditor(scorer, tmp_path / "roi.png", configured=False)
    amap = np.zeros((64, 64), np.float32)
    amap[20:30, 5:15] = 0.5  # a defect on the left
    assert scorer.decide(amap, 0.5, (192, 256)).anomalous
    for bad in ([], [[[0, 0], [1, 1]]], [[["a", 0], [1, 1], [2, 2]]], [[[0, 0], [float("nan"), 1], [2, 2]]], "x"):
        with pytest.raises(ValueError):
            editor.save(bad, 256, 192)
    assert not (tmp_path / "roi.png").exists()
    editor.save([[[128, 0], [255, 0], [255, 191], [128, 191]]], 256, 192)
    assert scorer.decide(amap, 0.5, (192, 256)).anomalous is False  # outside the region
    assert editor.current()["width"] == 256 and len(editor.current()["polygons"]) == 1
    assert cv2.imread(str(tmp_path / "roi.png"), cv2.IMREAD_GRAYSCALE)[:, :128].max() == 0
    editor.clear()
    assert not (tmp_path / "roi.png").exists() and scorer.decide(amap, 0.5, (192, 256)).anomalous


def test_bind_addresses_and_shipped_page():
    """Parsing of --http, the loopback rule, and every static file matched by the package-data globs."""
    import fnmatch
    import tomllib

    from edge_ad.errors import ConfigError
    from edge_ad.view.access import parse_bind, validate_http

    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("[::1]:8080") == ("::1", 8080) and parse_bind("0.0.0.0:80") == ("0.0.0.0", 80)
    for text in ("localhost:8080", "127.0.0.2:8080", "[::1]:9000"):
        validate_http(text, None)  # loopback: no token needed
    for text in ("0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080", "line3-pc:8080"):
        with pytest.raises(ConfigError, match="needs a token"):
            validate_http(text, None)
    for text in ("host:port", "1:99999"):
        with pytest.raises(ConfigError):
            validate_http(text, None)
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["edge_ad.view"]
    static = sorted(p.relative_to(root / "edge_ad" / "view").as_posix() for p in (root / "edge_ad/view/static").iterdir())
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(static)
    assert [f for f in static if not any(fnmatch.fnmatch(f, g) for g in globs)] == [], "not shipped in the wheel"


def test_several_cameras_in_one_process_share_one_page(browser, bundle_dir, defect_video, tmp_path):
    """A `cameras` config runs both cameras in one process; the page lists both and switches between them."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = free_port()
    config = tmp_path / "cameras.toml"
    config.write_text(f'model = "{bundle_dir}"\nhttp = "127.0.0.1:{port}"\nrealtime = true\ndevice_id = "pc"\n'
                      f'jsonl = "-"\n[[cameras]]\ncamera_id = "infeed"\nvideo = "{defect_video}"\n'
                      f'[[cameras]]\ncamera_id = "outfeed"\nvideo = "{defect_video}"\nimage_threshold = 0.99\n')
    proc = start_cli("--config", config, env={"STATE_DIRECTORY": str(tmp_path / "state")})
    url = f"http://127.0.0.1:{port}"
    try:
        _serving(proc, url)
        wait_until(lambda: json.loads(_get(url + "/api/info")[2])["cameras"] == ["infeed", "outfeed"], timeout=30,
                   what="both cameras registered")
        outfeed = json.loads(_get(url + "/api/state?camera=outfeed")[2])
        assert outfeed["camera"] == "outfeed" and outfeed["threshold"] == 0.99
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: d.find_element(By.ID, "camera-pick").is_displayed())
        wait.until(lambda d: d.find_element(By.ID, "frame-info").text.startswith("infeed frame"))
        select = Select(browser.find_element(By.ID, "camera"))
        assert [o.text for o in select.options] == ["infeed", "outfeed"]
        select.select_by_visible_text("outfeed")
        wait.until(lambda d: d.find_element(By.ID, "frame-info").text.startswith("outfeed frame"))
    finally:
        _stop(proc)


def test_shared_view_release_errors_and_restart_in_process(tmp_path, capfd):
    """In-process: release removes only this run's camera; a client that leaves, deeply nested JSON and
    garbage requests leave no traceback on stderr; the last release closes under the lock, so the next
    camera can bind the same port at once; the same port with another host or token is refused."""
    import socket
    from types import SimpleNamespace

    from edge_ad.decide.scoring import Scorer
    from edge_ad.errors import ConfigError
    from edge_ad.model.bundle import Thresholds
    from edge_ad.ops.stats import RuntimeStats
    from edge_ad.view.server import LiveView

    port = free_port()
    config = SimpleNamespace(http=f"127.0.0.1:{port}", http_token_file=None)
    scorer = Scorer(Thresholds(image=0.15, pixel=0.25, image_min=0.0, image_max=0.3, pixel_min=0.0, pixel_max=0.5))
    first, second = LiveView.for_config(config), LiveView.for_config(config)
    assert first is second
    topics = SimpleNamespace(device="pc1", camera="cam")
    mine = first.add_camera(topics, scorer, RuntimeStats(), roi_mask=str(tmp_path / "roi.png"))
    with pytest.raises(ConfigError, match="two cameras named"):
        second.add_camera(topics, scorer, RuntimeStats(), roi_mask=str(tmp_path / "roi2.png"))
    second.release(None)  # the failed run had no camera of its own: "cam" stays
    assert first.camera_ids() == ["cam"]
    with pytest.raises(ConfigError, match="one host"):
        LiveView.for_config(SimpleNamespace(http=f"localhost:{port}", http_token_file=None))
    token = tmp_path / "token"
    token.write_text("another-token-123\n")
    with pytest.raises(ConfigError, match="one view token"):
        LiveView.for_config(SimpleNamespace(http=f"127.0.0.1:{port}", http_token_file=str(token)))

    url = f"http://127.0.0.1:{port}"
    nested = b"[" * 100000 + b"]" * 100000
    status, _, body = _get(url + "/api/roi?camera=cam", {"Content-Type": "application/json"}, "POST", nested)
    assert status == 400 and b"nested" in body
    for raw in (b"GET /api/frame?camera=cam HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # then gone before the answer
                b"\x16\x03\x01\x02\x00garbage\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            client.sendall(raw)
    assert _get(url + "/api/info")[0] == 200
    first.release(mine)  # the last user
    again = LiveView.for_config(config)  # the port is free at once
    assert again is not first and again.camera_ids() == []
    again.release(None)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err
