"""The page in a real browser: Debian's headless Chromium driven by Playwright (never a browser of
Playwright's own), against `imgindex serve` running as a real process on a small index.

Without Chromium the test is skipped, unless IMGINDEX_REQUIRE_BROWSER=1 (CI sets it, and
installs Chromium), when a missing browser is a failure. IMGINDEX_SCREENSHOTS=DIR keeps the
screenshots there (the README's comes from such a run).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

import imgindex

from .conftest import DATA, FakeVectorizer
from .test_server import start_server

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("IMGINDEX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium chromium-driver")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        yield launched
        launched.close()


@pytest.fixture
def server(tmp_path):
    folder = tmp_path / "pics"
    for name in ("pizza", "bonsai", "Leopards"):
        shutil.copytree(DATA / name, folder / name)
    shutil.copy(folder / "pizza" / "image_0001.jpg", folder / "pizza" / "copy.jpg")
    with imgindex.Index.create(tmp_path / "idx", vectorizer=FakeVectorizer(device="cpu")) as ix:
        ix.sync(folder)
    child, url = start_server(tmp_path / "idx")
    yield url, folder, tmp_path / "idx"
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=30)


def screenshot(page, tmp_path: Path, name: str) -> Path:
    target = Path(os.environ.get("IMGINDEX_SCREENSHOTS") or tmp_path) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target))
    return target


def thumbnails_loaded(page, selector: str) -> None:
    """Every thumbnail under ``selector`` has loaded and decoded to a picture."""
    page.wait_for_function(
        f"""() => {{
            const images = [...document.querySelectorAll({selector!r} + ' img')];
            return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);
        }}""",
        timeout=30_000,
    )


def test_upload_click_back_and_review_in_a_real_browser(browser, server, tmp_path):
    url, folder, index_path = server
    page = browser.new_page(viewport={"width": 1366, "height": 860})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#view-search:not([hidden])")

    # Upload an image: results as thumbnails that load, and the query in the URL.
    page.set_input_files("#file-input", str(folder / "pizza" / "image_0002.jpg"))
    page.wait_for_function("() => location.search.includes('q=u%3A')")
    page.wait_for_selector("#answers .card")
    thumbnails_loaded(page, "#answers")
    assert page.locator("#answers h2").first.inner_text() == "Query: image_0002.jpg"
    assert page.locator("#answers .card").count() == 19  # every image: k is 20
    uploaded_url = page.url
    screenshot(page, tmp_path, "search.png")

    # Click a result: a new query from it ("more like this"); back returns to the upload.
    first = page.locator("#answers .card").first
    clicked_id = first.get_attribute("data-id")
    clicked_name = first.locator(".name").inner_text()
    first.locator("button.thumb").click()
    page.wait_for_function(f"() => location.search.includes('q={clicked_id}')")
    page.wait_for_function(
        f"() => document.querySelector('#answers h2')?.textContent.endsWith({clicked_name!r})"
    )
    thumbnails_loaded(page, "#answers")
    page.go_back()
    page.wait_for_function(f"() => location.href === {uploaded_url!r}")
    page.wait_for_function(
        "() => document.querySelector('#answers h2')?.textContent === 'Query: image_0002.jpg'"
    )

    # Duplicates: keep one of the exact copies; the decision survives a reload.
    page.goto(url + "?view=duplicates&threshold=0.5")
    page.wait_for_selector("#groups .group")
    thumbnails_loaded(page, "#groups")
    assert page.locator("#groups .group").count() == 1
    screenshot(page, tmp_path, "duplicates.png")
    page.locator("#groups .group .card").first.locator("button.keep").click()
    page.wait_for_function("() => document.querySelectorAll('#groups .group').length === 0")
    page.reload()
    page.wait_for_selector("#marked .card")
    assert page.locator("#groups .group").count() == 0
    assert page.locator("#marked .card .name").inner_text() in (
        "pizza/copy.jpg",
        "pizza/image_0001.jpg",
    )
    with imgindex.Index.open(index_path) as index:  # kept in the index itself
        assert len(index.marked_for_removal()) == 1

    # Browse: a paged grid, and one image's record with its neighbours.
    page.goto(url + "?view=browse&order=path")
    page.wait_for_selector("#browse-grid .card")
    page.locator("#browse-grid .card").first.locator("button", has_text="details").click()
    page.wait_for_selector("#record-neighbours .card")
    thumbnails_loaded(page, "#record-neighbours")
    assert "/pics/" in page.locator("#record-facts dd").first.inner_text()
    screenshot(page, tmp_path, "browse.png")
    assert errors == []
