"""report.html in a real browser (headless Chromium): the summary comes first and no page is
wider than its window, with wide tables scrolling inside their own box. CI installs Debian's
Chromium (.ci/run); elsewhere the test is skipped, saying so."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from analysis import report
from tests.test_analysis import MODELS, SyntheticStudy, config_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run does)")

# measured after load: page width against the window, and where the summary and first table sit
PROBE = """<script>window.addEventListener('load', () => {
  const first = document.querySelector('table');
  const summary = document.getElementById('summary');
  const wide = [...document.body.querySelectorAll('*')].filter(e => !e.closest('.scroll, details:not([open])')
      && e.getBoundingClientRect().right > window.innerWidth + 1).map(e => e.tagName + '.' + e.className).slice(0, 5);
  document.body.setAttribute('data-probe', JSON.stringify({
    scroll: document.documentElement.scrollWidth, inner: window.innerWidth, wide: wide,
    summaryTop: summary.getBoundingClientRect().top, tableTop: first.getBoundingClientRect().top,
    summaryText: summary.nextElementSibling.innerText}));
});</script>"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser") / "study"
    study = SyntheticStudy(root, rng_seed=3)
    for model in MODELS:
        study.run(model, 0, all_zero=model == "vgg16")
    path = report.analyze(root, config_for(MODELS, [0]))
    probe = path.with_name("probe.html")
    probe.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    return SimpleNamespace(probe=probe)


def _measure(page: Path, width: int) -> dict:
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe did not run:\n" + dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize("width", [1400, 1000])
def test_no_element_is_wider_than_the_window(rendered, width):
    measured = _measure(rendered.probe, width)
    assert measured["scroll"] <= measured["inner"] == width, measured
    assert measured["wide"] == [], measured


def test_the_summary_is_above_the_first_table_and_says_what_was_left_out(rendered):
    measured = _measure(rendered.probe, 1400)
    assert measured["summaryTop"] < measured["tableTop"]
    assert "Classifiers shown to work" in measured["summaryText"]
    assert "VGG16 (seed 0, gradcam): 60 of 60 maps are all-zero or constant" in measured["summaryText"]
