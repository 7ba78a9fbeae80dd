"""The web monitors in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium;
`make test` installs them when missing): log in with a key, submit a 2-second job on the bundled model,
watch it reach 100 %, play the video, see the contact sheet, delete the job; a wrong key is refused; the
farm view lists a submitted job, a failed job's bar red and a cancelled one's grey. Screenshots go to the test's directory, and to $LONGTAKE_SCREENSHOTS
when set (the README's come from there)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if os.environ.get("LONGTAKE_REQUIRE_BROWSER") and not (CHROMIUM and CHROMEDRIVER):  # CI: never skip them
    raise RuntimeError("LONGTAKE_REQUIRE_BROWSER is set, and there is no chromium / chromedriver on PATH")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="no chromium / chromedriver (make test installs Debian's packages)")
TOKEN = "web-admin-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("LONGTAKE_SCREENSHOTS"):
        target = Path(os.environ["LONGTAKE_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def web_server(ray_session, tmp_path_factory):
    """`longtake serve` as the CLI deploys it, on the bundled model."""
    from ray import serve

    from longtake.pipelines import inspect_model
    from longtake.serve.deployments import build_app
    from longtake.serve.manager import Limits

    data_dir = tmp_path_factory.mktemp("web")
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(inspect_model("default").path, str(data_dir), TOKEN, "cpu", 0, 1,
                    Limits(max_seconds=10, max_queued=4), downscale_delay_s=5, model_name="default")
    serve.run(app, name="longtake", route_prefix="/")
    yield f"http://127.0.0.1:{port}", data_dir
    serve.shutdown()


def wait(driver, condition, timeout=30, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def log_in(driver, base, key):
    driver.get(base + "/")
    wait(driver, lambda d: by_id(d, "key").is_displayed(), what="login form")
    field = by_id(driver, "key")
    field.clear()
    field.send_keys(key)
    by_id(driver, "login-submit").click()


@needs_browser
def test_log_in_render_play_and_delete_in_the_browser(browser, web_server, tmp_path):
    from selenium.webdriver.common.by import By

    from longtake.serve.keys import KeyStore

    base, data_dir = web_server
    key = KeyStore(data_dir).add("studio")

    log_in(browser, base, "lt_not-a-key")  # a wrong key is refused, and not kept
    wait(browser, lambda d: by_id(d, "login-error").is_displayed(), what="wrong key refused")
    assert "wrong" in by_id(browser, "login-error").text.lower()
    assert browser.execute_script("return sessionStorage.getItem('longtake.key')") is None

    log_in(browser, base, key)
    wait(browser, lambda d: by_id(d, "whoami").text.startswith("studio"), what="logged in")
    assert key not in browser.current_url
    browser.get(base + "/#/new")
    wait(browser, lambda d: by_id(d, "prompt").is_displayed(), what="submit form")
    by_id(browser, "prompt").send_keys("a red ball on blue")
    seconds = by_id(browser, "seconds")
    seconds.clear()
    seconds.send_keys("2")
    shot(browser, tmp_path, "monitor-submit.png")
    by_id(browser, "submit").click()
    wait(browser, lambda d: "#/jobs/" in d.current_url, what="job page after submit")
    job_id = browser.current_url.rsplit("/", 1)[1]
    assert len(job_id) == 16

    seen = set()

    def done(d):  # the status first, then the bar: a job that finishes between the two reads still shows 100
        finished = by_id(d, "job-status").text == "done" and by_id(d, "job-percent").text.startswith("100")
        seen.add(int(by_id(d, "job-progress").get_attribute("value") or 0))
        return finished

    wait(browser, done, timeout=240, what="the job reaches 100 %")
    assert max(seen) == 100
    job = requests.get(f"{base}/v1/videos/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert job["status"] == "done" and job["client"] == "studio" and job["result"]["frames"] == 16

    # the player loads the MP4 through a signed link (byte ranges), reports its duration and plays
    wait(browser, lambda d: by_id(d, "player").is_displayed() and by_id(d, "player").get_attribute("src"),
         what="the player has the video")
    assert key not in by_id(browser, "player").get_attribute("src")
    duration = wait(browser, lambda d: d.execute_script(
        "const v = document.getElementById('player'); return v.readyState >= 1 && v.duration > 0 ? v.duration : 0"),
        timeout=30, what="video metadata")
    assert duration == pytest.approx(2.0, abs=0.3)
    browser.execute_script("const v = document.getElementById('player'); v.muted = true; v.play();")
    wait(browser, lambda d: d.execute_script("return document.getElementById('player').currentTime") > 0.2,
         timeout=30, what="the video plays")
    wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('preview'); return !i.hidden && i.complete && i.naturalWidth > 0"),
        what="the contact sheet")
    assert '"prompt": "a red ball on blue"' in by_id(browser, "job-request").text
    assert "done" in by_id(browser, "job-log").text
    shot(browser, tmp_path, "monitor-job.png")

    browser.get(base + "/#/")
    row = f"tr[data-id='{job_id}']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), what="the job in the list")
    assert browser.find_element(By.CSS_SELECTOR, f"{row} td.status").text == "done"
    # the workers view: the denoiser replica that rendered it, with its window-steps (serve_pool.ReplicaBoard)
    cells = wait(browser, lambda d: [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                                     for tr in d.find_elements(By.CSS_SELECTOR, "#workers tbody tr")],
                 what="the replicas in the workers view")
    assert all(c[0] and c[1] != "-" for c in cells) and sum(int(c[5]) for c in cells) >= 1, cells
    shot(browser, tmp_path, "monitor-jobs.png")
    browser.set_window_size(375, 800)  # a phone's width: nothing wider than the screen
    time.sleep(0.5)
    assert browser.execute_script("return document.documentElement.scrollWidth") <= 375
    shot(browser, tmp_path, "monitor-phone.png")
    browser.set_window_size(1280, 1000)

    browser.get(f"{base}/#/jobs/{job_id}")
    wait(browser, lambda d: by_id(d, "job-status").text == "done", what="job page")
    by_id(browser, "delete").click()
    by_id(browser, "delete").click()  # asks again, then deletes
    wait(browser, lambda d: d.current_url.endswith("#/"), what="back to the list")
    wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row), what="the job left the list")
    gone = requests.get(f"{base}/v1/videos/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert gone.status_code == 410


@pytest.fixture(scope="module")
def farm_monitor(tmp_path_factory):
    from longtake.cluster import farm

    farm_dir = tmp_path_factory.mktemp("farm")
    request = {"prompt": "a red ball", "seconds": 2, "steps": 2, "out": str(farm_dir / "a.mp4")}
    (record, _), = farm.submit(farm_dir, [(request, 7, None)])
    servers = [_start_monitor(farm_dir, key) for key in (None, "monitor-key")]
    yield record.id, servers[0][1], servers[1][1]
    for server, _ in servers:
        server.should_exit = True


def _start_monitor(farm_dir, key):
    """`longtake farm monitor` of `farm_dir` in a thread: (uvicorn server, its URL)."""
    import uvicorn

    from longtake.serve.farm_monitor import build_monitor

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_monitor(farm_dir, key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def test_farm_monitor_api_is_read_only_and_keyed(farm_monitor):
    job_id, open_url, keyed_url = farm_monitor
    jobs = requests.get(open_url + "/api/jobs", timeout=30).json()["jobs"]
    assert [(j["id"], j["state"], j["priority"], j["retries"], j["blocklist"]) for j in jobs] == [
        (job_id, "queued", 7, 0, [])]
    assert "submitted (priority 7)" in requests.get(f"{open_url}/api/jobs/{job_id}", timeout=30).json()["log"]
    assert requests.get(keyed_url + "/api/jobs", timeout=30).status_code == 401
    assert requests.get(keyed_url + "/api/jobs", headers={"Authorization": "Bearer monitor-key"}, timeout=30).ok
    assert requests.post(open_url + "/api/jobs", timeout=30).status_code == 405  # nothing to change
    assert requests.delete(f"{open_url}/api/jobs/{job_id}", timeout=30).status_code == 405
    r = requests.get(open_url + "/", timeout=30)
    assert "script-src 'self'" in r.headers["Content-Security-Policy"] and "<script src=" in r.text


def test_farm_retries_and_blocklist_come_from_the_job_log():
    from longtake.cluster.jobs import JobRecord
    from longtake.serve.farm_monitor import farm_job

    log = ("2026-12-02 10:00:00 WARNING longtake.actors.pool: retrying window 3 step 2 (attempt 2 of 3) after: boom\n"
           "2026-12-02 10:00:01 WARNING longtake.actors.ray_pool: excluding worker 1 after 3 failed tasks (last: x); "
           "1 workers left\n"
           "2026-12-02 10:00:02 WARNING longtake.actors.pool: retrying window 4 step 2 (attempt 2 of 3) after: boom\n")
    job = farm_job(JobRecord(id="0123456789abcdef", state="running", request={}), log)
    assert job["retries"] == 2 and job["blocklist"] == ["worker 1"]


@needs_browser
def test_farm_view_lists_a_submitted_job(browser, farm_monitor, tmp_path):
    from selenium.webdriver.common.by import By

    job_id, open_url, keyed_url = farm_monitor
    browser.get(open_url + "/")
    row = f"tr[data-id='{job_id}']"
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), what="the farm job listed")
    assert browser.find_element(By.CSS_SELECTOR, f"{row} td.state").text == "queued"
    assert browser.find_element(By.CSS_SELECTOR, f"{row} td.priority").text == "7"
    browser.find_element(By.CSS_SELECTOR, f"{row} a.job-link").click()
    wait(browser, lambda d: "submitted (priority 7)" in by_id(d, "farm-log").text, what="the job's log")
    shot(browser, tmp_path, "farm-monitor.png")

    log_in(browser, keyed_url, "wrong-key")  # the keyed monitor asks for its key
    wait(browser, lambda d: by_id(d, "login-error").is_displayed(), what="wrong monitor key refused")
    log_in(browser, keyed_url, "monitor-key")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), what="listed with the key")


@needs_browser
def test_a_failed_job_bar_is_red_at_the_share_it_reached(browser, tmp_path):
    """The job list's bar of a failed job is red, of a cancelled one grey, at the share of window steps it
    reached; a job that failed in its last phase (every step done) is a red full bar, not a blue one like a
    finished job's. (app.js's list and job page use the same LT.showProgress as this farm view.)"""
    import io

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    from longtake.cluster import farm

    farm_dir = tmp_path / "farm"
    records = [r for r, _ in farm.submit(farm_dir, [({"prompt": "a red ball", "seconds": 2, "steps": 2,
                                                      "out": str(tmp_path / f"{n}.mp4")}, 0, None) for n in range(5)])]
    store = farm.open_store(farm_dir)
    states = {"failed": ("failed", 3), "cancelled": ("cancelled", 5), "failed_late": ("failed", 10),
              "done": ("done", 10), "running": ("running", 4)}  # (state, window steps done of 10)
    ids = dict(zip(states, (r.id for r in records)))
    for name, (state, done) in states.items():
        store.update(ids[name], state=state, progress={"phase": "denoise", "step": 1, "steps": 2,
                                                       "window_steps_done": done, "window_steps_total": 10})
    bar = {name: f"tr[data-id='{job_id}'] progress" for name, job_id in ids.items()}

    def colour(name):  # the bar as drawn, its mean RGB: the filled part dominates a full bar
        png = browser.find_element(By.CSS_SELECTOR, bar[name]).screenshot_as_png
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), float).reshape(-1, 3).mean(0)

    server, url = _start_monitor(farm_dir, None)
    try:
        browser.get(url + "/")
        wait(browser, lambda d: all(d.find_elements(By.CSS_SELECTOR, b) for b in bar.values()), what="the jobs")
        look = {name: browser.execute_script(
            "const p = document.querySelector(arguments[0]);"
            "return [p.value, p.className, getComputedStyle(p).accentColor,"
            "        p.closest('tr').querySelector('span.percent').textContent];", b) for name, b in bar.items()}
        failed_late, done = colour("failed_late"), colour("done")
        shot(browser, tmp_path, "farm-failed.png")
    finally:
        server.should_exit = True
    red, grey, blue = "rgb(180, 35, 24)", "rgb(124, 127, 134)", "rgb(36, 86, 199)"  # style.css's colours
    assert look["failed"] == [30, "progress bar-failed", red, "30 %"], look
    assert look["cancelled"] == [50, "progress bar-cancelled", grey, "50 %"], look
    assert look["failed_late"] == [100, "progress bar-failed", red, "100 %"], look
    assert look["done"] == [100, "progress", blue, "100 %"] and look["running"] == [40, "progress", blue, "40 %"], look
    assert failed_late[0] > failed_late[2] + 40 and done[2] > done[0] + 40, (failed_late, done)  # red; blue


@needs_browser
def test_the_workers_view_and_the_window_grid_follow_a_simulated_run(browser, ray_session, tmp_path):
    """#33 part 5: a simulated Wan run (sim family: the real model's channels and scheduler at a reduced size,
    its compute slept) on a farm runner with 2 Ray workers. The farm monitor lists both workers with their node
    and the window and step each computes, /metrics has their series, and the job's window x step grid fills
    until every cell is done."""
    import re

    from selenium.webdriver.common.by import By

    from longtake.cluster import farm
    from longtake.pipelines.sim import build_sim

    model = build_sim(tmp_path / "sim", "wan-14b-720p", height=64, width=64, native_window=5, overlap=2,
                      text_tokens=8, text_dim=32, predict_s=1.2, decode_s=0)
    farm_dir = tmp_path / "farm"
    request = {"prompt": "a long take through a city at night", "model": str(model), "seconds": 3, "fps": 16, "steps": 4,
               "out": str(tmp_path / "sim.mp4")}
    (record, _), = farm.submit(farm_dir, [(request, 0, None)])
    runner = farm.Runner(farm_dir, workers=2, checkpoint_every=2, min_free_mb=0)
    thread = threading.Thread(target=runner.serve_forever, kwargs={"exit_when_idle": True}, daemon=True)
    server, url = _start_monitor(farm_dir, None)
    thread.start()
    try:
        browser.get(url + "/")
        now = "#workers tbody tr td:nth-child(6)"  # runner, job, worker, node, state, now
        seen = wait(browser, lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, now)
                                        if re.fullmatch(r"window \d+, step \d+", c.text)], timeout=120,
                    what="a worker computing a window")
        rows = browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        assert len(rows) == 2 and seen
        assert all(re.fullmatch(r"[\d.]+/[0-9a-f]{6}", r.find_elements(By.TAG_NAME, "td")[3].text) for r in rows)
        first = rows[0].find_element(By.CSS_SELECTOR, "td span")  # the runner: host and pid, the whole id on hover
        assert first.get_attribute("title") == runner.id and first.text == ":".join(runner.id.split(":")[:2])
        metrics = requests.get(url + "/metrics", timeout=30).text
        assert re.search(rf'longtake_worker_window_steps{{job="{record.id}",node="[^"]+",runner="[^"]+",'
                         r'worker="[01]"} \d', metrics), metrics
        shot(browser, tmp_path, "farm-workers.png")
        browser.get(f"{url}/#/jobs/{record.id}")
        cells = "#farm-grid .cell"
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, cells), what="the window x step grid")
        windows = len(farm.open_store(farm_dir).get(record.id).progress["windows"])
        assert len(browser.find_elements(By.CSS_SELECTOR, cells)) == windows * 4
        done = lambda d: len(d.find_elements(By.CSS_SELECTOR, cells + ".done"))  # noqa: E731
        partly = wait(browser, lambda d: 0 < done(d) < windows * 4 and done(d), timeout=60, what="a partial grid")
        wait(browser, lambda d: done(d) == windows * 4, timeout=120, what="every cell of the grid done")
        assert partly < windows * 4
        shot(browser, tmp_path, "farm-grid.png")
        store, deadline = farm.open_store(farm_dir), time.monotonic() + 120
        while store.get(record.id).state != "done" and time.monotonic() < deadline:  # delivery after the grid
            time.sleep(0.2)
    finally:
        runner.stop.set()
        thread.join(120)
        server.should_exit = True
    assert farm.open_store(farm_dir).get(record.id).state == "done"


@needs_browser
def test_the_farm_view_shows_a_storys_shots_and_what_they_wait_for(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from longtake.cluster import farm

    store = farm.open_store(tmp_path / "farm")
    first, _ = store.create({"prompt": "a red ball moving right"},
                            story={"film": "film.yaml", "shot": "s1", "begin": "cut", "after": None})
    second, _ = store.create({"prompt": "a red ball moving up"}, depends=[first.id],
                             story={"film": "film.yaml", "shot": "s2", "begin": "continue", "after": "s1"})
    server, url = _start_monitor(tmp_path / "farm", None)
    try:
        browser.get(url + "/")
        row = f"tr[data-id='{second.id}']"
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f"{row} td.prompt"), what="the shot listed")
        cell = browser.find_element(By.CSS_SELECTOR, f"{row} td.prompt").text
        assert cell == f"film.yaml:s2 after {first.id[:8]} a red ball moving up", cell
        assert browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{first.id}'] td.prompt").text == \
            "film.yaml:s1 a red ball moving right"
        browser.find_element(By.CSS_SELECTOR, f"{row} a.job-link").click()
        wait(browser, lambda d: "waits for" in by_id(d, "farm-job-meta").text, what="the shot's details")
        meta = by_id(browser, "farm-job-meta").text
        assert "story film.yaml, shot s2 (continue)" in meta and f"waits for {first.id}" in meta, meta
    finally:
        server.should_exit = True
