"""The static dashboard in a real headless browser (Debian's chromium + chromedriver, driven by selenium):
the index loads without console errors, lists every latent page by page, search filters, a header click
re-sorts, and a latent page opens with working previous/next links."""

import shutil
from pathlib import Path

import pytest
import torch

import sae
from extraction.store import open_store
from revelio.analysis.browser import PAGE_SIZE, FeatureBrowser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium + chromedriver on PATH; `make test` installs "
                       "them with apt-get (Debian packages chromium, chromium-driver) when run as root"),
]


@pytest.fixture(scope="module")
def dashboard(sd_store, tmp_path_factory):
    """A dashboard of a 120-latent SAE (more than one index page) on the tiny-sd store."""
    out = tmp_path_factory.mktemp("dash")
    with open_store(sd_store) as st:
        x, _ = st.tokens("up_blocks.1", 25, slice(None))
    model = sae.SparseAutoencoder(x.shape[1], 120, 6, seed=2)
    model.init_from_data(torch.from_numpy(x))
    folder = sae.save(model, out / "sae", extra={"hook": "up_blocks.1", "timestep": 25, "samples": "tokens",
                                                 "source_store": str(sd_store)})
    model = sae.load(folder)
    with open_store(sd_store) as st:
        b = FeatureBrowser(st, model, rows=range(16), top_k=4, progress=False)
        index = b.export(out / "html", by="frequency", limit=6)
        rows = b.summary_rows("frequency", include_dead=True)
    return index, b, rows


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield d
    d.quit()


def console_errors(d) -> list[str]:
    return [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"]


def shown_ids(d) -> list[int]:
    return [int(r.get_attribute("data-id")) for r in d.find_elements("css selector", "#body tr")]


def test_index_pages_search_and_sort(dashboard, driver, tmp_path):
    index, b, rows = dashboard
    d_sae = b.stats.d_sae
    driver.get(index.as_uri())
    assert console_errors(driver) == []
    assert driver.find_element("id", "count").text == f"latents 1-{PAGE_SIZE} of {d_sae}"
    # first page: the first PAGE_SIZE latents in the export's order (frequency, descending; ties by id)
    by_freq = sorted(range(d_sae), key=lambda j: (-b.stats.frequency[j], j))
    assert shown_ids(driver) == by_freq[:PAGE_SIZE]
    seen = list(shown_ids(driver))
    while driver.find_element("id", "next").is_enabled():
        driver.find_element("id", "next").click()
        seen += shown_ids(driver)
    assert sorted(seen) == list(range(d_sae))  # every latent, each once, over the pages
    assert driver.find_element("id", "prev").is_enabled()

    search = driver.find_element("id", "search")
    search.send_keys("17")
    assert shown_ids(driver) == [17]  # a latent id matches exactly
    search.clear()
    concept = next(r["best_concept"] for r in rows if r["best_concept"])
    search.send_keys(concept)
    hits = shown_ids(driver)
    want = [r["latent"] for r in rows if concept in " ".join(str(r[k] or "") for k in ("best_concept", "label",
                                                                                        "description")).lower()]
    assert hits and set(hits) <= set(want) and len(hits) == min(len(want), PAGE_SIZE)
    assert "matching" in driver.find_element("id", "count").text
    search.clear()
    search.send_keys("no such concept")
    assert shown_ids(driver) == [] and driver.find_element("id", "count").text == "no latent matches"
    search.clear()
    search.send_keys(" ")
    search.clear()

    driver.find_element("css selector", "th[data-key='id']").click()  # latent id, ascending
    assert shown_ids(driver) == list(range(PAGE_SIZE))
    assert driver.find_element("id", "sorted").text == "latent (ascending)"
    driver.find_element("css selector", "th[data-key='id']").click()
    assert shown_ids(driver) == list(range(d_sae - 1, d_sae - 1 - PAGE_SIZE, -1))
    driver.find_element("css selector", "th[data-key='purity']").click()
    ids = shown_ids(driver)
    pur = [b.purity[j] for j in ids]
    assert [p for p in pur if p == p] == sorted([p for p in pur if p == p], reverse=True)
    assert driver.find_element("id", "sorted").text == "purity (descending)"
    assert "-0.000" not in driver.find_element("tag name", "body").text
    driver.save_screenshot(str(tmp_path / "index.png"))
    assert console_errors(driver) == []


def test_latent_page_opens_with_prev_next(dashboard, driver):
    index, b, _ = dashboard
    order = b.order("frequency")[:6]
    driver.get(index.as_uri())
    driver.find_element("css selector", f"#body a[href='latent_{order[1]:05d}.html']").click()
    assert driver.find_element("tag name", "h2").text == f"Latent {order[1]}"
    assert console_errors(driver) == []
    imgs = driver.find_elements("css selector", ".card img")
    assert imgs and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in imgs)
    assert driver.find_elements("css selector", ".cbar")  # the heat maps' colour scale
    driver.find_element("id", "next").click()
    assert driver.find_element("tag name", "h2").text == f"Latent {order[2]}"
    driver.find_element("id", "prev").click()
    driver.find_element("id", "prev").click()
    assert driver.find_element("tag name", "h2").text == f"Latent {order[0]}"
    assert not driver.find_elements("id", "prev")  # the first page has no previous
    assert Path(driver.current_url.removeprefix("file://")).parent == index.parent
    driver.save_screenshot(str(index.parent / "latent.png"))
