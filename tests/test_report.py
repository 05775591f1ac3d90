"""`csmcir report` and `csmcir serve`, opened in headless Chromium (Debian chromium + chromium-driver)."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from csmcir.cli import main
from csmcir.report import highlight

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def test_highlight_marks_shared_words_and_escapes_html():
    assert highlight("a <b>red</b> Circle", {"red", "circle"}) == "a &lt;b&gt;<mark>red</mark>&lt;/b&gt; <mark>Circle</mark>"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _wait_images(driver, timeout=20.0):
    """Every <img> on the page finished loading; returns [(alt, naturalWidth)]."""
    end = time.time() + timeout
    while time.time() < end:
        if driver.execute_script("return Array.from(document.images).every(i => i.complete)"):
            break
        time.sleep(0.05)
    return driver.execute_script("return Array.from(document.images).map(i => [i.alt, i.naturalWidth])")


def _console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_report_opens_from_disk_with_every_image_and_the_ground_truth_where_the_ranking_puts_it(
    trained, easy_bench, tmp_path, browser, capsys
):
    import numpy as np
    from selenium.webdriver.common.by import By

    from csmcir.data.custom import CustomCIR
    from csmcir.teacher import TeacherStore

    out = tmp_path / "report"
    first = [t.id for t in CustomCIR(easy_bench).triplets("val")[:2]]
    TeacherStore(tmp_path / "teacher", model="m", mode="full").append(
        first, np.zeros((2, 4), np.float32), ["<b>because</b> red", "so blue"]
    )
    assert (
        main(
            [
                "report",
                "--ckpt",
                str(trained / "last.ckpt"),
                "--root",
                str(easy_bench),
                "--split",
                "val",
                "--out",
                str(out),
                "-k",
                "5",
                "--limit",
                "45",
                "--teacher",
                str(tmp_path / "teacher"),
                "--no-progress",
            ]
        )
        == 0
    )
    rankings = json.loads((out / "rankings.json").read_text())
    from csmcir.data.custom import CustomCIR

    targets = {t.id: set(t.targets) for t in CustomCIR(easy_bench).triplets("val")}
    browser.get((out / "index.html").as_uri())
    browser.get_log("browser")  # start clean
    browser.refresh()
    # the teacher's reasoning, escaped, under the queries that have one
    q0 = browser.find_element(By.CSS_SELECTOR, f"div.q[data-query='{first[0]}'] details.reasoning")
    assert q0.get_attribute("textContent").endswith("<b>because</b> red")
    assert len(browser.find_elements(By.CSS_SELECTOR, "details.reasoning")) == 2
    seen = 0
    for page in range(3):  # 45 queries, 20 a page
        imgs = _wait_images(browser)
        assert imgs and all(w > 0 for _, w in imgs), [a for a, w in imgs if w == 0]
        for q in browser.find_elements(By.CSS_SELECTOR, "div.q"):
            qid = q.get_attribute("data-query")
            expected = [r for r, i in enumerate(rankings[qid], start=1) if i in targets[qid]]
            marked = [int(c.get_attribute("data-rank")) for c in q.find_elements(By.CSS_SELECTOR, ".card.hit.gt")]
            assert marked == expected, qid
            seen += 1
        if page < 2:
            browser.find_elements(By.CSS_SELECTOR, "#pager-top button")[1].click()
    assert seen == 45
    assert not _console_errors(browser)
    # failures only: no query with the ground truth at rank 1 remains
    browser.find_elements(By.CSS_SELECTOR, "#pager-top button")[0].click()
    browser.find_element(By.ID, "failures").click()
    shown = [q.get_attribute("data-query") for q in browser.find_elements(By.CSS_SELECTOR, "div.q")]
    assert shown and all(rankings[q][0] not in targets[q] for q in shown)


@pytest.fixture(scope="module")
def server(trained, easy_bench, tmp_path_factory):
    from csmcir.report.serve import SearchApp, make_server

    index = tmp_path_factory.mktemp("index") / "val"
    assert main(["index", "--ckpt", str(trained / "last.ckpt"), "--root", str(easy_bench), "--split", "val", "--out", str(index)]) == 0
    app = SearchApp(index, trained / "last.ckpt", device="cpu", k=6, max_upload_mb=0.05)
    srv = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", app
    srv.shutdown()
    srv.server_close()


def _status(url, data=None, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {})) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_serve_upload_through_the_page_shows_the_hits(server, easy_bench, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, app = server
    browser.get(url + "/")
    browser.get_log("browser")
    ref = easy_bench / "images" / f"{app.ids[0]}.png"
    browser.find_element(By.ID, "image").send_keys(str(ref))
    browser.find_element(By.ID, "text").send_keys("make it red")
    browser.find_element(By.ID, "go").click()
    # the click submits the form: wait for the answer page, not the page being left
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".card.hit"))
    hits = browser.find_elements(By.CSS_SELECTOR, ".card.hit")
    assert len(hits) == 6 and all(h.get_attribute("data-id") in app.row for h in hits)
    imgs = _wait_images(browser)
    assert len(imgs) == 7 and all(w > 0 for _, w in imgs)  # the reference and six hits
    assert not _console_errors(browser)
    # a text file is refused with a message on the page
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    browser.get(url + "/")
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "text").send_keys("make it red")
    browser.find_element(By.ID, "go").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "error"))  # the answer page, as above
    assert "not an image" in browser.find_element(By.ID, "error").text


def test_serve_refuses_traversal_oversized_and_malformed_requests(server, easy_bench):
    url, app = server
    assert _status(url + "/image/0")[0] == 200
    for path in (
        "/image/../../../../etc/passwd",
        "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/image/..%2Fcaptions.jsonl",
        f"/image/{len(app.ids)}",
        "/image/-1",
        f"/image/{app.ids[0]}",
        "/../index_info.json",
    ):
        assert _status(url + path)[0] == 404, path
    boundary = uuid.uuid4().hex

    def body(image: bytes, text: str = "make it red") -> bytes:
        return (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n{text}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    png = (easy_bench / "images" / f"{app.ids[0]}.png").read_bytes()
    assert _status(url + "/search", body(png), headers)[0] == 200
    status, page = _status(url + "/search", body(png, text=""), headers)
    assert status == 400 and b"no modification text" in page
    status, page = _status(url + "/search", body(png[:30]), headers)
    assert status == 400 and b"not an image" in page
    status, page = _status(url + "/search", body(png + b"\0" * 60_000), headers)
    assert status == 413 and b"larger than" in page
