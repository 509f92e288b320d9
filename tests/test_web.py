"""The web chat in a real browser: Debian's chromium driven by playwright, against a live server.
Screenshots go to test-artifacts/ (or $NANOSEEK_ARTIFACTS)."""

import os
import threading
from pathlib import Path

import pytest
from conftest import REPLY
from playwright.sync_api import expect, sync_playwright

from nanoseek.infer.chat import split_thinking
from nanoseek.infer.engine import Engine
from nanoseek.serve.app import create_app
from nanoseek.serve.server import ThreadedServer

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("NANOSEEK_ARTIFACTS", "test-artifacts"))
THINK, ANSWER = split_thinking(REPLY)
QUESTION = "What is 2 + 2?"


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: make test installs it (apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def start(chat_model, api_key=None, step_delay=0.0):
    model, tok = chat_model
    engine = Engine(model, tok, max_seqs=4, context=256)
    if step_delay:  # a slower model, so that the reply arrives in many pieces
        step = engine.step
        engine.step = lambda: (threading.Event().wait(step_delay), step())[1]
    return ThreadedServer(create_app(engine, api_key=api_key))


def set_greedy(page):
    page.locator("#settings summary").click()
    page.fill("#temperature", "0")
    page.locator("#temperature").dispatch_event("change")
    page.locator("#settings summary").click()


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_streams_thinks_renders_safely_and_remembers(browser, chat_model):
    with start(chat_model, step_delay=0.01) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url + "/")
        set_greedy(page)
        page.evaluate("""window.renders = 0; new MutationObserver(() => window.renders++)
                         .observe(document.getElementById('messages'), {childList: true})""")
        send(page, QUESTION)
        answer = page.locator(".msg.assistant .answer").last
        expect(answer).to_contain_text("done.", timeout=30_000)
        assert page.evaluate("window.renders") > 5  # the reply streamed in, piece by piece
        expect(page.locator(".msg.user .bubble")).to_have_text(QUESTION)
        # the answer: markdown rendered, hostile HTML shown as text and never run
        assert answer.locator("strong").inner_text() == "Four"
        assert answer.locator("code").inner_text() == "2 + 2"
        assert "<script>window.pwned = 1</script>" in answer.inner_text()
        assert '<img src=x onerror="window.pwned = 2">' in answer.inner_text()
        assert answer.locator("script").count() == 0 and answer.locator("img").count() == 0
        assert page.evaluate("window.pwned") is None
        # the Thinking panel: folded once the answer came, opens and closes on a click
        panel = page.locator("details.thinking").last
        expect(panel.locator(".reasoning")).to_have_text(THINK)
        assert panel.evaluate("d => d.open") is False
        panel.locator("summary").click()
        assert panel.evaluate("d => d.open") is True
        page.screenshot(path=str(ARTIFACTS / "chat-desktop.png"), full_page=True)
        panel.locator("summary").click()
        assert panel.evaluate("d => d.open") is False
        # regenerate replaces the last reply with a new one
        page.locator("button.regenerate").click()
        expect(page.locator(".msg.assistant")).to_have_count(1)
        expect(page.locator(".msg.assistant .answer").last).to_contain_text("done.", timeout=30_000)
        # the conversation survives a reload
        page.reload()
        expect(page.locator("#conversations li")).to_have_count(1)
        expect(page.locator("#conversations li button.open")).to_have_text(QUESTION)
        expect(page.locator(".msg.assistant .answer").last).to_contain_text("done.")
        # installable: manifest with icons, a service worker in control
        manifest = page.evaluate("fetch('/manifest.webmanifest').then(r => r.json())")
        assert {i["sizes"] for i in manifest["icons"]} >= {"192x192", "512x512"}
        assert manifest["display"] == "standalone" and manifest["start_url"] == "/"
        size = page.evaluate("""new Promise(ok => { const i = new Image(); i.onload = () => ok(i.naturalWidth);
                                 i.src = '/icons/icon-512.png'; })""")
        assert size == 512
        assert page.evaluate("navigator.serviceWorker.ready.then(r => !!r.active)") is True
        page.close()


def test_phone_layout_keeps_everything_on_screen(browser, chat_model):
    with start(chat_model) as server:
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
        page = ctx.new_page()
        page.goto(server.url + "/")
        page.evaluate("localStorage.setItem('nanoseek.temperature', '0')")
        page.reload()
        send(page, QUESTION)
        expect(page.locator(".msg.assistant .answer").last).to_contain_text("done.", timeout=30_000)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        for sel in ("#composer", "#input", "#send", "header", "#menu"):
            box = page.locator(sel).bounding_box()
            assert box and box["x"] >= 0 and box["y"] >= 0, sel
            assert box["x"] + box["width"] <= 390 + 0.5 and box["y"] + box["height"] <= 844 + 0.5, sel
        for sel in (".msg.user .bubble", ".msg.assistant .answer"):
            box = page.locator(sel).last.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 390 + 0.5, sel
        assert not page.locator("#sidebar").evaluate("e => e.getBoundingClientRect().right > 0")  # off-canvas
        page.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
        page.locator("#menu").click()
        expect(page.locator("#conversations li button.open")).to_be_visible()
        page.wait_for_timeout(300)  # the slide-in transition
        page.screenshot(path=str(ARTIFACTS / "chat-phone-menu.png"))
        ctx.close()


def test_key_prompt_and_lost_connection(browser, chat_model):
    server = start(chat_model, api_key="web-key")
    with server:
        page = browser.new_page()
        page.on("dialog", lambda d: d.accept("web-key"))
        page.goto(server.url + "/")
        set_greedy(page)
        send(page, QUESTION)
        expect(page.locator(".msg.assistant .answer").last).to_contain_text("done.", timeout=30_000)
        assert page.evaluate("localStorage.getItem('nanoseek.apiKey')") == '"web-key"'
    # the server is gone: a clear message, and the question is kept
    send(page, "hi")
    expect(page.locator("#error")).to_contain_text("Connection lost", timeout=15_000)
    expect(page.locator(".msg.user .bubble").last).to_have_text("hi")
    page.screenshot(path=str(ARTIFACTS / "chat-connection-lost.png"))
    page.close()


def test_server_errors_are_shown(browser, chat_model):
    with start(chat_model) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        send(page, "What is 2 + 2? " * 100)  # past the 256-token window
        expect(page.locator("#error")).to_contain_text("context window is 256 tokens", timeout=15_000)
        expect(page.locator(".msg.assistant")).to_have_count(0)
        page.close()


def test_the_thinking_panel_shows_each_calculator_call_and_its_result(browser, calc_model):
    """A model that calls the calculator while it thinks: the Thinking panel shows each call as
    one chip, "expression = result", with the calculator's own result, and no tool tokens."""
    from nanoseek.tools import calculator

    with start(calc_model) as server:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url + "/")
        set_greedy(page)
        send(page, "What is 55 + 23 + 41?")
        expect(page.locator(".msg.assistant .answer").last).not_to_be_empty(timeout=30_000)
        expect(page.locator("#send")).to_be_visible(timeout=30_000)
        panel = page.locator("details.thinking").last
        panel.locator("summary").click()
        chips = panel.locator(".tool-call")
        assert chips.count() >= 1
        for text in chips.all_inner_texts():
            expression, _, result = text.rpartition(" = ")
            assert result == calculator(expression), text
        assert "tool" not in panel.locator(".reasoning").inner_text()
        page.screenshot(path=str(ARTIFACTS / "chat-calculator.png"), full_page=True)
        page.close()
