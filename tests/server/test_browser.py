"""The web page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Skipped, with the reason, where Chromium or Playwright is not installed (`.ci/run` installs both).
Saves the screenshot to docs/server.png.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lite.server.launch import REPO, ServerProcess
from tests.server.test_openai_client import KEY, keyed_server

CHROMIUM = os.environ.get("OVIS_LITE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
PHONE = {"width": 412, "height": 915}  # a phone-width viewport
DESKTOP = {"width": 1280, "height": 800}


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install chromium; .ci/run does it where apt works)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements.txt)")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        except Exception as exc:  # noqa: BLE001 - a broken browser install is an environment problem
            pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> ServerProcess:
    return keyed_server(tiny_dir)  # the page asks for the key, as a user would type it


def _watch_bar(page, bar_id: str) -> None:
    """Record every value the progress bar takes, even several set between two renderings: each mutation
    record carries the value it replaced; the bar's current value is the last one."""
    page.evaluate("""id => { window.barOld = []; const bar = document.getElementById(id);
        new MutationObserver((records) => records.forEach((r) => window.barOld.push(Number(r.oldValue))))
            .observe(bar, {attributes: true, attributeFilter: ["value"], attributeOldValue: true}); }""", bar_id)


def _bar_values(page, bar_id: str) -> list[float]:
    old = page.evaluate("window.barOld")
    return [*old[1:], page.eval_on_selector("#" + bar_id, "bar => bar.value")]


def test_page_generates_and_chats(browser, server: ServerProcess, tiny_dir: Path, tmp_path: Path) -> None:
    upload = tmp_path / "upload.png"
    Image.new("RGB", (64, 48), (30, 120, 200)).save(upload)
    page = browser.new_page(viewport=PHONE)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"{r.url} {r.failure}"))
    page.on("response", lambda r: errors.append(f"{r.url} {r.status}") if r.status >= 400 else None)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('preset')")
    assert tiny_dir.name in page.inner_text("header")  # the checkpoint served, not a fixed name
    assert page.is_visible("#apikey")  # the server wants a key: the page asks for it
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")

    # Text-to-image: 64x64, 3 steps, seed 123; the bar rises step by step, the image and its seed appear as a
    # download, the last noisy preview goes away, and the gallery has it.
    page.click("nav button[data-tab=generate]")
    page.fill("#gen-prompt", "a red fox in the snow")
    page.fill("#gen-w", "64")
    page.fill("#gen-h", "64")
    page.fill("#gen-steps", "3")
    page.fill("#gen-seed", "123")
    _watch_bar(page, "gen-progress")
    # A job already running keeps the page's job queued until the page watches it, so the page sees every
    # step (a 3-step tiny job could otherwise finish before the page subscribes to its events).
    busy = httpx.post(server.url + "/v1/jobs", timeout=30, headers={"Authorization": f"Bearer {KEY}"},
                      json={"task": "generate", "prompt": "busy", "size": "64x64", "steps": 60})
    assert busy.status_code == 202, busy.text
    page.click("#gen-go")
    caption = page.wait_for_selector("#gen-result figure figcaption", timeout=60_000)
    assert "seed 123" in caption.inner_text() and "64x64" in caption.inner_text()
    assert re.search(r"· \d+\.\d s$", caption.inner_text()), caption.inner_text()  # "0.4 s", not "0.4123s"
    values = _bar_values(page, "gen-progress")
    assert values == [0, 1, 2, 3], values  # it moved with each step, up to 3 of 3
    size = page.eval_on_selector("#gen-result a[download] img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == [64, 64]
    assert page.get_attribute("#gen-result a[download]", "download").endswith("-123.png")
    assert page.is_hidden("#gen-preview")
    assert page.inner_text("#count") == "1"
    assert page.inner_text("#gen-status") == "done"

    # Chat: upload an image, ask, and see the streamed answer (sampled, so the tiny model says something).
    page.click("nav button[data-tab=chat]")
    page.set_input_files("#chat-image", str(upload))
    page.fill("#chat-input", "What is it?")
    page.fill("#chat-temp", "1")
    page.fill("#chat-max", "24")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    shown = page.eval_on_selector(".msg.assistant span", "s => s.textContent")
    chunks = int(page.get_attribute(".msg.assistant", "data-chunks") or 0)
    assert page.query_selector(".msg.user img") is not None  # the uploaded image is in the conversation

    # The page's answer is the API's answer to the same conversation (without surrounding blank lines).
    import base64

    uri = "data:image/png;base64," + base64.b64encode(upload.read_bytes()).decode()
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"}, json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                  {"type": "text", "text": "What is it?"}]}],
        "max_tokens": 24, "temperature": 1})
    expected = r.json()["choices"][0]["message"]["content"]
    assert shown == expected.strip() and chunks >= 1  # (the tiny random LLM mostly answers newlines)
    bubble = page.eval_on_selector(".msg.assistant", "d => [d.classList.contains('empty'), d.offsetHeight]")
    assert bubble[0] == (expected.strip() == "")
    if bubble[0]:
        assert bubble[1] < 60, bubble  # "(empty answer)" on one line, not a tall empty sliver
    assert "tokens streamed" in page.inner_text("#chat-status")

    page.click("nav button[data-tab=generate]")
    shot = REPO / "docs" / "server.png"
    shot.parent.mkdir(exist_ok=True)
    png = page.screenshot(full_page=True)
    shot.write_bytes(png)
    assert Image.open(io.BytesIO(png)).size[0] == PHONE["width"]
    assert not errors, errors


def test_page_uses_the_width_of_a_desktop(browser, server: ServerProcess) -> None:
    """At 1280 px the form and its results sit side by side, and the page spans most of the window."""
    page = browser.new_page(viewport=DESKTOP)
    page.goto(server.url + "/")
    page.click("nav button[data-tab=generate]")
    form = page.eval_on_selector("#tab-generate .form", "e => e.getBoundingClientRect().toJSON()")
    output = page.eval_on_selector("#tab-generate .output", "e => e.getBoundingClientRect().toJSON()")
    assert output["left"] >= form["right"] and abs(output["top"] - form["top"]) < 5, (form, output)
    section = page.eval_on_selector("#tab-generate", "e => e.getBoundingClientRect().width")
    assert section >= 0.9 * (DESKTOP["width"] - 40), section
    icon = httpx.get(server.url + "/favicon.ico", timeout=10)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
