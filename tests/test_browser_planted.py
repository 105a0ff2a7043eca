"""In a real headless Chromium: pick the planted model ("default model with facts stored twice — constructed
for demonstration") in the sidebar, pick one of its planted facts, and on the Intervene page switch each planted
group off alone (the fact survives) and all of them together (it is gone).

The planted model takes minutes of CPU to build.  The test uses `cache/planted/default-twice` when it has been
built (`python -m dkn plant`; read only, linked into the test's private cache folder), and otherwise builds a
smaller one (one fact stored twice, no controls) into that private folder once per session.  The repository's
own cache is never written.  Needs Debian's chromium and Playwright; skipped without them.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.app_support import CHROMIUM, REPO, idle, make_cache_dir, open_app, streamlit_server
from tests.test_browser import page, percent, shot  # noqa: F401  (page: a fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="no /usr/bin/chromium: run `make browser`"),
]


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    """A private cache folder holding the default model (linked) and a planted default model."""
    from dkn.planted import MANIFEST, PlantParams, build_planted_default

    cache = make_cache_dir(tmp_path_factory.mktemp("dkn-planted-cache"))
    built = REPO / "cache" / "planted" / "default-twice"
    (cache / "planted").mkdir()
    if (built / MANIFEST).exists() and (built / "model.safetensors").exists():
        (cache / "planted" / "default-twice").symlink_to(built, target_is_directory=True)
    else:
        build_planted_default(
            cache / "planted" / "default-twice",
            PlantParams(n_degenerate=1, n_single=0, n_additive=0, steps=60),  # one fact: 60 steps suffice
            log=lambda m: None,
        )
    return cache


@pytest.fixture(scope="module")
def server(planted_cache):
    with streamlit_server(planted_cache) as url:
        yield url


def after(page, before: float, timeout_s: float = 60) -> float:  # noqa: F811
    """'P(answer) after' once it has changed from `before` (or the timeout passed)."""
    end = time.time() + timeout_s
    while percent(page, "P(answer) after") == before and time.time() < end:
        time.sleep(0.3)
    return percent(page, "P(answer) after")


def test_planted_fact_survives_each_group_and_dies_with_all(planted_cache, server, page):  # noqa: F811
    from dkn.planted import read_manifest

    fact = next(
        (
            f
            for f in read_manifest(planted_cache / "planted" / "default-twice")
            if f.kind == "degenerate" and f.verified
        ),
        None,
    )
    assert fact is not None, "the planted model has no verified degenerate fact: rebuild it with `python -m dkn plant`"
    open_app(page, server)

    # the planted model, clearly labelled as constructed
    page.locator("[data-testid='stSidebar'] label:has-text('Planted demo (constructed)')").click()
    idle(page)
    page.get_by_role("button", name="Load model").click()
    page.wait_for_selector("summary:has-text('Planted facts')", timeout=300_000)  # shown once it is loaded
    idle(page)
    assert page.locator("[data-testid='stSidebar'] :text('constructed for demonstration')").count() > 0
    page.locator("summary:has-text('Planted facts')").click()
    page.wait_for_selector(f"[data-testid='stSidebar'] :text('{fact.prompt} → {fact.answer}')", timeout=30_000)

    # its planted fact, one prompt
    page.locator(".st-key-w_builtin_fact input").first.click()
    page.locator(f"[role='option']:has-text('{fact.prompt} → {fact.answer}')").first.click()
    idle(page)
    page.locator("summary:has-text('Settings')").click()
    box = page.locator("[class*='st-key-set_max_prompts'] input")
    box.fill("1")
    box.press("Enter")
    idle(page)
    page.get_by_role("button", name="Run attribution on 1 prompt").click()
    page.wait_for_selector("text=Computed in", timeout=300_000)
    idle(page)

    # the planted groups, typed as the sidebar lists them
    page.locator("[data-testid='stSidebarNav'] a:has-text('Intervene')").first.click()
    page.wait_for_selector("text=Effect on the answer", timeout=120_000)
    idle(page)
    for i, group in enumerate(fact.groups):
        page.locator("[data-testid='stForm'] [data-testid='stTextInput'] input").fill(", ".join(map(str, group)))
        page.get_by_role("button", name="Add group").click()
        page.wait_for_selector(f"[data-testid='stCheckbox']:has-text('My group {i + 1} ·')", timeout=120_000)
        idle(page)
    before = percent(page, "P(answer) before")
    assert percent(page, "P(answer) after") == before

    def toggle(i: int) -> None:
        page.locator(f"[data-testid='stCheckbox']:has-text('My group {i + 1} ·')").first.click()
        idle(page)

    for i in range(len(fact.groups)):  # each group alone: the fact survives
        toggle(i)
        value = percent(page, "P(answer) after")
        assert abs(value - before) < 0.05 * before, (i, before, value)
        toggle(i)
    for i in range(len(fact.groups)):  # all together: it is gone
        toggle(i)
    gone = after(page, before)
    assert gone < 0.7 * before, (before, gone)
    shot(page, "intervene-planted")
    assert page.locator("[data-testid='stException']").count() == 0
