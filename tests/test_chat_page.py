"""The chat page at ``/`` in a real browser (Debian's headless Chromium, driven by Selenium through
the system chromedriver), and the README's curl example run as written, both against ``llamita
serve`` in a subprocess; the page's API-key and error handling against a small stand-in server.
Nothing waits on timing: the page's state is polled (WebDriverWait).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import httpx  # a missing test dependency fails the module loudly: no skips
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from helpers import poll, running_server

pytestmark = pytest.mark.slow  # a server in a subprocess, and a browser

ROOT = Path(__file__).parent.parent
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# The machine may have no network: keep Chromium from calling home (and from needing a sandbox or a GPU).
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1000,900")
MODEL = "smollm2-135m-instruct"
SYSTEM = "Answer in one short sentence."
MAX_TOKENS = 24
GENERATION_S = 300  # the longest a reply may take on a loaded two-core machine


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server("--max-batch", "4", "--max-seq-len", "1024") as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium from /usr/bin, with a throwaway profile; never Selenium Manager's download."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    assert not missing, (f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                         "missing): apt-get install -y chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: WebDriver, url: str) -> WebDriverWait:
    """The page loaded, with the model's name shown (so its first API call worked)."""
    browser.get(f"{url}/")
    wait = WebDriverWait(browser, GENERATION_S, poll_frequency=0.1)
    wait.until(lambda d: MODEL in d.find_element(By.ID, "model").text)
    return wait


def fill(browser: WebDriver, field: str, value: str) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def replies(browser: WebDriver) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, "#messages .msg.assistant")


def send(browser: WebDriver, wait: WebDriverWait, text: str, outcome: str = "done") -> WebElement | None:
    """Types ``text``, clicks Send and waits until the page's turn has ended (its ``data-turns``) and Send
    is enabled again; checks how it ended; the reply's element (None when the turn was undone)."""
    turns = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-turns") or 0)
    fill(browser, "prompt", text)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: int(d.find_element(By.TAG_NAME, "body").get_attribute("data-turns") or 0) == turns + 1
               and d.find_element(By.ID, "send").is_enabled())
    ended = browser.find_element(By.TAG_NAME, "body").get_attribute("data-outcome")
    assert ended == outcome, f"the turn ended {ended}: {browser.find_element(By.ID, 'error').text}"
    return replies(browser)[-1] if replies(browser) else None


def greedy(url: str, messages: list[dict[str, str]]) -> tuple[str, str]:
    """The server's own non-streamed answer to the page's request: its text and finish_reason."""
    r = httpx.post(f"{url}/v1/chat/completions", timeout=GENERATION_S,
                   json={"messages": messages, "temperature": 0, "top_p": 1, "max_tokens": MAX_TOKENS})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def save_screenshot(browser: WebDriver, tmp_path: Path, name: str) -> Path:
    """A PNG of the page under ``tmp_path``, copied to $LLAMITA_ARTIFACTS (default: ./artifacts, git-ignored)."""
    shot = tmp_path / name
    assert browser.save_screenshot(str(shot)), "the browser took no screenshot"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = Path(os.environ.get("LLAMITA_ARTIFACTS") or ROOT / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / name)
    return shot


def test_the_page_is_one_self_contained_file(server):
    """GET / answers the packaged page, which loads nothing from elsewhere."""
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == resources.files("llamita.serve").joinpath("static/chat.html").read_bytes()
    assert "://" not in r.text and "<link" not in r.text and "src=" not in r.text  # no CDN, no fonts, no files
    assert "innerHTML" not in r.text  # model output is set as text
    assert "/" not in httpx.get(f"{server}/openapi.json").json()["paths"]


def test_streamed_replies_are_the_greedy_answers(server, browser, tmp_path):
    """Two turns typed into the page, at temperature 0: each reply arrives in several chunks and reads
    exactly as the server's non-streamed answer to the same conversation, system prompt included."""
    wait = open_page(browser, server)
    fill(browser, "system", SYSTEM)
    fill(browser, "temperature", "0")
    fill(browser, "top_p", "1")
    fill(browser, "max_tokens", str(MAX_TOKENS))
    messages = [{"role": "system", "content": SYSTEM}]
    for question in ("What is a llama?", "And where do they live?"):
        reply = send(browser, wait, question)
        text = reply.get_property("textContent")
        messages.append({"role": "user", "content": question})
        assert text and (text, reply.get_attribute("data-finish")) == greedy(server, messages)
        messages.append({"role": "assistant", "content": text})
        assert int(reply.get_attribute("data-chunks")) > 1  # several deltas...
        assert int(reply.get_attribute("data-reads")) > 1  # ...read off the body as they came
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages .msg.user")] == \
        ["What is a llama?", "And where do they live?"]
    assert not browser.find_element(By.ID, "stop").is_enabled()
    save_screenshot(browser, tmp_path, "chat_page.png")


def test_stop_errors_and_new_chat(server, browser):
    """Stop cancels the generation on the server; New chat empties the conversation; a refused
    request shows the server's message and gives the text back."""
    wait = open_page(browser, server)
    fill(browser, "temperature", "0")
    fill(browser, "max_tokens", "900")
    cancelled = 'llamita_requests_total{outcome="cancelled"}'
    before = metrics(server).get(cancelled, 0)
    fill(browser, "prompt", "Count from 1 to 500, separated by commas.")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: replies(d) and int(replies(d)[-1].get_attribute("data-chunks")) >= 2)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: replies(d)[-1].get_attribute("data-state") == "stopped" and
               d.find_element(By.ID, "send").is_enabled())
    poll(lambda: metrics(server).get(cancelled, 0) == before + 1, "the server to cancel the stopped request")

    browser.find_element(By.ID, "reset").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#messages .msg"))

    fill(browser, "max_tokens", "5000")  # past the context of 1024: a 400
    expected = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                                 "max_tokens": 5000}).json()["error"]["message"]
    send(browser, wait, "Hi", outcome="error")
    assert browser.find_element(By.ID, "error").text == expected
    assert browser.find_element(By.ID, "prompt").get_property("value") == "Hi"  # to send again
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages .msg")  # the refused turn is gone
    fill(browser, "max_tokens", "4")
    send(browser, wait, "Hi")  # the page works on after an error, and the error is cleared
    assert not browser.find_element(By.ID, "error").is_displayed()


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


class KeyedServer(BaseHTTPRequestHandler):
    """A stand-in for a server run with an API key (``sesame``): the page at /, 401 without the key, and
    a stream that sends two pieces of text (one of them markup) and then an error object."""

    PIECES = ("<b>Hel</b>", "lo")
    requests: list[dict[str, Any]] = []

    def do_GET(self) -> None:
        if self.path == "/":
            self.answer(200, resources.files("llamita.serve").joinpath("static/chat.html").read_bytes(), "text/html")
        elif self.authorized():
            self.answer(200, {"object": "list", "data": [{"id": "keyed-model", "context_length": 4096}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self.authorized():
            return
        self.requests.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in self.PIECES:
            self.event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]})
        self.event({"error": {"message": "the engine failed mid-stream", "type": "server_error"}})

    def authorized(self) -> bool:
        if self.headers.get("Authorization") == "Bearer sesame":
            return True
        self.answer(401, {"error": {"message": "a valid API key is required", "type": "invalid_request_error"}})
        return False

    def answer(self, status: int, body: bytes | dict, kind: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def event(self, data: dict) -> None:
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def keyed_server() -> Iterator[str]:
    KeyedServer.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), KeyedServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()


def test_api_key_401_and_an_error_in_the_stream(keyed_server, browser):
    """Without a key the page says it needs one; with it, every call carries it (and it outlives a
    reload); model text is shown as text; an error object in the stream is shown, the text before it kept."""
    browser.get(f"{keyed_server}/")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    wait.until(lambda d: "API key" in d.find_element(By.ID, "error").text)
    send(browser, wait, "Hi", outcome="error")
    assert "API key" in browser.find_element(By.ID, "error").text and "401" in browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "prompt").get_property("value") == "Hi"
    assert KeyedServer.requests == []

    fill(browser, "api-key", "sesame")
    browser.find_element(By.ID, "system").click()  # the key field's change event
    wait.until(lambda d: d.find_element(By.ID, "model").text == "keyed-model · context 4096 tokens")
    assert not browser.find_element(By.ID, "error").is_displayed()
    reply = send(browser, wait, "Hi", outcome="error")
    assert browser.find_element(By.ID, "error").text == "the engine failed mid-stream"
    assert reply.get_property("textContent") == "".join(KeyedServer.PIECES)  # markup shown as text...
    assert not reply.find_elements(By.TAG_NAME, "b")  # ...not made into elements
    assert [(r["stream"], r["messages"]) for r in KeyedServer.requests] == [(True, [{"role": "user", "content": "Hi"}])]

    browser.refresh()
    wait.until(lambda d: d.find_element(By.ID, "model").text.startswith("keyed-model"))
    assert browser.find_element(By.ID, "api-key").get_property("value") == "sesame"


def test_the_readme_curl_example_runs_as_written(server):
    """The README's curl example, run by bash with only its host:port changed, answers a chat completion."""
    assert shutil.which("curl"), "curl is missing: the README's curl example cannot be run (apt-get install curl)"
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl -s localhost:8000/v1/chat/completions "))
    end = start
    while lines[end].endswith("\\"):  # continued lines
        end += 1
    command = "\n".join(lines[start:end + 1])
    assert command.count("localhost:8000") == 1 and "Content-Type: application/json" in command
    host = re.sub(r"^https?://", "", server)
    run = subprocess.run(["bash", "-c", command.replace("localhost:8000", host)], capture_output=True, text=True,
                         timeout=GENERATION_S)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")
