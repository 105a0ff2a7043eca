"""End to end in a real headless Chromium: start the app, attribute a built-in fact on the default model,
see the heatmap, suppress every BDC on the Intervene page and see the answer's probability drop, export a
PNG; screenshots of every page go to the ignored cache/screenshots/ (or $DKN_SCREENSHOTS_DIR: `make
screenshots` points it at the committed results/screenshots/ to refresh them).

Needs Debian's chromium (`make browser`) and the Playwright Python package; skipped without them.
"""

from __future__ import annotations

import io
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.app_support import CHROMIUM, REPO, idle, make_cache_dir, open_app, streamlit_server

SHOTS = Path(os.environ.get("DKN_SCREENSHOTS_DIR") or REPO / "cache" / "screenshots")  # never tracked files
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="no /usr/bin/chromium: run `make browser`"),
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = make_cache_dir(tmp_path_factory.mktemp("dkn-browser-cache"))  # empty store: attribution really runs
    with streamlit_server(cache) as url:
        yield url


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            accept_downloads=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def shot(page, name: str) -> None:
    """A screenshot of the whole page (Streamlit scrolls inside its main block, so grow the viewport)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=\"stMain\"]'); return m ? m.scrollHeight : 1000 }"
    )
    page.set_viewport_size({"width": 1400, "height": max(1000, min(int(height) + 40, 8000))})
    time.sleep(1.0)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


def percent(page, label: str) -> float:
    value = page.locator(f"[data-testid='stMetric']:has-text('{label}') [data-testid='stMetricValue']").first
    return float(re.sub(r"[^0-9.e-]", "", value.inner_text()))


def go_to(page, title: str, marker: str, timeout_s: float = 120) -> None:
    page.locator(f"[data-testid='stSidebarNav'] a:has-text('{title}')").first.click()
    page.wait_for_selector(f"text={marker}", timeout=timeout_s * 1000)
    idle(page)


def test_end_to_end(server, page):
    open_app(page, server)  # the model loads first

    # pick a built-in fact
    page.locator(".st-key-w_builtin_fact input").first.click()
    page.locator("[role='option']:has-text('The capital of France is → Paris')").first.click()
    idle(page)
    assert page.locator("[data-testid='stTextInput'] input").first.input_value() == "The capital of France is"

    # one prompt, t = 0.15: a quick attribution whose knowledge neurons still form a group
    page.locator("summary:has-text('Settings')").click()
    box = page.locator("[class*='st-key-set_max_prompts'] input")
    box.fill("1")
    box.press("Enter")
    idle(page)
    page.locator(".st-key-set_t input").first.focus()
    page.keyboard.press("ArrowLeft")
    idle(page)
    run = page.get_by_role("button", name="Run attribution on 1 prompt")
    run.click()
    page.wait_for_selector("text=Computed in", timeout=300_000)
    idle(page)
    page.wait_for_selector(".st-key-fig_heatmap .main-svg", timeout=60_000)  # the heatmap, drawn
    page.wait_for_selector(".st-key-fig_layers .main-svg", timeout=60_000)  # the per-layer summary
    shot(page, "explore")

    go_to(page, "Degenerate neurons", "Candidate groups")
    page.wait_for_selector(".st-key-fig_graph .main-svg", timeout=60_000)
    page.wait_for_selector(".st-key-fig_barcode .main-svg", timeout=60_000)
    shot(page, "degenerate")

    go_to(page, "Intervene", "Effect on the answer")
    before = percent(page, "P(answer) after")
    page.locator(".st-key-all_bdcs button").click()
    idle(page)
    end = time.time() + 60
    while percent(page, "P(answer) after") == before and time.time() < end:
        time.sleep(0.3)
    after = percent(page, "P(answer) after")
    assert after < 0.5 * before, (before, after)

    # export the intervention figure as PNG
    page.locator("[data-testid='stMain'] [data-testid='stPopover'] button").first.click()  # not the sidebar's
    with page.expect_download(timeout=120_000) as info:
        page.get_by_role("button", name="PNG image").first.click()
    data = open(info.value.path(), "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(io.BytesIO(data)).size[0] > 100
    page.keyboard.press("Escape")
    shot(page, "intervene")

    go_to(page, "Experiments", "Run a small experiment")
    shot(page, "experiments")
    assert page.locator("[data-testid='stException']").count() == 0


def _health(url: str) -> bytes:
    return urllib.request.urlopen(f"{url}/_stcore/health", timeout=10).read()


def _type_own(page, prompt: str, answer: str) -> None:
    page.locator("[data-testid='stRadio'] label:has-text('Type your own')").first.click()
    idle(page)
    for label, text in (("Prompt", prompt), ("Answer", answer)):
        box = page.get_by_label(label, exact=True)
        box.fill(text)
        box.press("Enter")
        idle(page)


def test_long_prompt_is_refused_and_the_server_stays_up(server, page):
    open_app(page, server)
    _type_own(page, " ".join(["history"] * 3000), "Paris")
    try:
        page.wait_for_selector("text=tokens long", timeout=60_000)
    except Exception:
        page.screenshot(path="/tmp/long_prompt_fail.png", full_page=True)
        raise
    assert page.locator("text=dkn accepts prompts of at most").count() >= 1
    assert page.get_by_role("button", name=re.compile("Run attribution")).count() == 0
    assert _health(server) == b"ok"  # the server is alive, for every session
    # and this session goes on: a short prompt works again
    _type_own(page, "The capital of France is", "Paris")
    page.wait_for_selector("text=2 · What the model predicts", timeout=120_000)
    assert page.locator("[data-testid='stException']").count() == 0


def test_typed_paraphrases_are_used(server, page):
    open_app(page, server)
    _type_own(page, "The capital of Japan is", "Tokyo")
    try:
        page.wait_for_selector("text=Run attribution on 1 prompt", timeout=180_000)
    except Exception:
        page.screenshot(path="/tmp/paraphrase_fail.png", full_page=True)
        raise
    grid = page.locator("[data-testid='stDataFrame']").first
    for row, text in enumerate(("Japan's capital is", "The capital city of Japan is")):
        grid.hover()  # the toolbar shows on hover ...
        add_row = page.locator(
            "[data-testid='stElementToolbarButton'] button[aria-label='Add row'], "
            "[data-testid='stElementToolbar'] button[aria-label='Add row']"
        ).first
        add_row.wait_for(state="visible")
        # ... and slides in over the grid's scroller, which can take the pointer click for a while (CI once
        # timed out on "element is not stable"): the click event goes to the button itself
        add_row.dispatch_event("click")
        idle(page)  # adding a row reruns the app
        # the new row's cell: open its editor (the grid is a canvas; rows and header are 35 px high)
        box = grid.bounding_box()
        editing = "() => !!document.activeElement && document.activeElement.classList.contains('gdg-input')"
        for _ in range(5):  # the grid may still be redrawing after the rerun: retry until its editor has focus
            page.mouse.dblclick(box["x"] + 200, box["y"] + GRID_ROW_PX * (row + 1) + GRID_ROW_PX // 2)
            time.sleep(0.5)
            if page.evaluate(editing):
                break
        page.keyboard.type(text)
        # Enter commits what the grid's editor state holds, which trails the keystrokes: wait for it
        page.wait_for_function("(t) => document.activeElement && document.activeElement.value === t", arg=text)
        time.sleep(0.2)
        page.keyboard.press("Enter")
        idle(page)
        label = "1 paraphrase:" if row == 0 else f"{row + 1} paraphrases:"
        page.wait_for_selector(f"text={label}", timeout=60_000)  # the row reached the app
    try:
        page.wait_for_selector("text=2 paraphrases: the fact has 3 prompts.", timeout=60_000)
    except Exception:
        page.screenshot(path="/tmp/paraphrase_fail.png", full_page=True)
        raise
    page.wait_for_selector("text=Run attribution on 3 prompts", timeout=60_000)
    # start it, then cancel: the run stops, the page says so, the server stays up
    page.get_by_role("button", name="Run attribution on 3 prompts").click()
    cancel = page.get_by_role("button", name="Cancel")
    cancel.wait_for(timeout=60_000)
    cancel.click()
    page.wait_for_selector("text=Attribution cancelled", timeout=120_000)
    assert _health(server) == b"ok"
    assert page.get_by_role("button", name="Run attribution on 3 prompts").count() == 1


GRID_ROW_PX = 35  # Streamlit data editor: header and row height


def _fresh_context(p, tmp_path, name: str):
    return p.chromium.launch_persistent_context(
        str(tmp_path / name),
        executable_path=CHROMIUM,
        args=ARGS,
        headless=True,
        viewport={"width": 1400, "height": 1000},
    )


def test_shared_link_restores_the_view_in_a_fresh_browser(server, tmp_path):
    query = "fact=builtin%2Fcapital%2FFrance&n=1&t=0.15&factor=0.5&mode=last"
    with sync_api.sync_playwright() as p:
        first = _fresh_context(p, tmp_path, "first")
        page = first.pages[0] if first.pages else first.new_page()
        open_app(page, f"{server}/?{query}")
        run = page.get_by_role("button", name="Run attribution on 1 prompt")
        if run.count():  # not cached yet in this server's store
            run.click()
            page.wait_for_selector("text=Computed in", timeout=300_000)
            idle(page)
        go_to(page, "Intervene", "Effect on the answer", timeout_s=400)  # the degeneracy analysis runs first
        page.locator("[data-testid='stCheckbox']:has-text('BDC A') label").first.click()
        idle(page)
        time.sleep(1.0)
        link = page.url
        assert "bdc=0" in link and "factor=0.5" in link and "fact=builtin" in link
        after = percent(page, "P(answer) after")
        title = page.locator(".st-key-fig_intervention .gtitle").first.text_content()
        first.close()

        fresh = _fresh_context(p, tmp_path, "fresh")  # nothing shared: a new profile
        try:
            page = fresh.pages[0] if fresh.pages else fresh.new_page()
            page.goto(link)
            page.wait_for_selector("text=Effect on the answer", timeout=400_000)
            idle(page)
            assert page.locator("[data-testid='stCheckbox']:has-text('BDC A') input").first.is_checked()
            assert percent(page, "P(answer) after") == after
            assert page.locator(".st-key-fig_intervention .gtitle").first.text_content() == title
        finally:
            fresh.close()


def test_facts_compared_flags_generic_neurons(server, page):
    """The Facts compared view in the browser: the missing facts are attributed on request (one prompt
    each), then the overlap matrix and the generic count appear, and the Explore page offers the
    knockout without the generic neurons."""
    open_app(page, f"{server}/?fact=builtin%2Fcapital%2FFrance&n=1")
    go_to(page, "Facts compared", "Generic: a knowledge neuron of at least")
    run = page.get_by_role("button", name=re.compile("Attribute the"))
    if run.count():  # not all cached yet in this server's store
        run.click()
    page.wait_for_selector(".st-key-fig_overlap .main-svg", timeout=600_000)
    idle(page)
    assert percent(page, "Generic knowledge neurons") >= 0
    assert page.locator(".st-key-fig_overlap .main-svg").count() >= 1  # plotly draws layered svgs
    go_to(page, "Explore", "Knowledge neurons")
    page.locator("summary:has-text('Without the generic neurons')").first.click()
    page.wait_for_selector("text=All knowledge neurons off", timeout=120_000)
    assert page.locator("[data-testid='stException']").count() == 0
