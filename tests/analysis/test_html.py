"""report.html in a real browser (headless Chromium) at a phone's, a laptop's and a desktop's
width: the summary comes first, no page is wider than its window (wide tables scroll inside their
own box), numbers never wrap, table columns are at least one word wide, long tables are folded,
degenerate map sets are marked, and every figure's text is at least 9 CSS px with no title over
another. CI installs Debian's Chromium (.ci/run); elsewhere the test is skipped, saying so."""

from __future__ import annotations

import html
import itertools
import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import matplotlib.text
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis import figures, report
from analysis.html import COLLAPSE_ROWS, PAPER_ONLY
from study.store import StudyStore
from tests.analysis.test_report import SyntheticStudy, config_for
from study.models import REGISTRY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,  # a real browser on the analysis of nine models
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium; .ci/run does)")]

MODELS = list(REGISTRY)  # every model, as the demo runs them
# all-zero map sets; ResNet-101's at its second layer too, so the summary points to the table listing them
DEGENERATE = ["vgg16", "resnet101", "vit_small", "vit_large"]
WIDTHS = [390, 1000, 1400]
SMALLEST_TEXT_PX = 9

# Measured after load, first as the page opens (details closed), then with every <details> open so
# that the folded tables are laid out too. A line count is the number of distinct line tops of a
# range's client rects: a word or a number split over two lines has two.
PROBE = """<script>window.addEventListener('load', () => {
  const degenerate = new Set(%(labels)s);
  const lines = range => new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;
  const contents = node => { const r = document.createRange(); r.selectNodeContents(node); return r; };
  const where = e => (e.closest('[id]') || {id: '?'}).id;
  const wideOnes = () => [...document.body.querySelectorAll('*')].filter(e => !e.closest('.scroll, details:not([open])')
      && e.getBoundingClientRect().right > window.innerWidth + 1).map(e => e.tagName + '.' + e.className).slice(0, 5);
  const first = document.querySelector('table');
  const summary = document.getElementById('summary');
  const result = {
    scroll: document.documentElement.scrollWidth, inner: window.innerWidth,
    viewport: (document.querySelector('meta[name=viewport]') || {}).content || null, wide: wideOnes(),
    summaryTop: summary.getBoundingClientRect().top, tableTop: first.getBoundingClientRect().top,
    summaryText: summary.nextElementSibling.innerText,
    links: [...document.querySelectorAll('a[href^="#"]')].map(a => {
      const target = document.getElementById(a.getAttribute('href').slice(1));
      return {text: a.textContent, found: !!target,
              down: !!target && target.getBoundingClientRect().top > a.getBoundingClientRect().top};
    }),
    tables: [...document.querySelectorAll('table')].map(t => ({
      id: where(t), rows: t.tBodies[0].rows.length, caption: t.closest('.table').querySelector('.caption').textContent,
      folded: !!t.closest('details') && !t.closest('details').open})),
    images: [...document.querySelectorAll('figure img')].map(i => ({
      file: i.dataset.file, natural: i.naturalWidth, shown: i.clientWidth}))};
  document.querySelectorAll('details').forEach(d => d.open = true);
  result.wideOpen = wideOnes();
  result.wrappedNumbers = [...document.querySelectorAll('td.num')].filter(c => lines(contents(c)) > 1)
      .map(c => where(c) + ': ' + c.innerText).slice(0, 5);
  result.splitWords = [];
  for (const cell of document.querySelectorAll('td.text, th')) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const word of node.data.matchAll(/\\S+/g)) {
        const range = document.createRange();
        range.setStart(node, word.index); range.setEnd(node, word.index + word[0].length);
        if (lines(range) > 1 || range.getBoundingClientRect().width > cell.clientWidth + 1)
          result.splitWords.push(where(cell) + ': ' + word[0]);
      }
    }
  }
  // a table with a `degenerate` column marks the rows it flags; any other marks every cell naming a degenerate model
  result.unmarked = [];
  for (const table of document.querySelectorAll('table')) {
    const heads = [...table.tHead.rows[0].cells].map(c => c.textContent);
    const flag = heads.indexOf('degenerate'), model = heads.indexOf('model');
    for (const row of table.tBodies[0].rows) {
      const named = [...row.cells].filter(c => c.firstChild && degenerate.has(c.firstChild.data));
      const due = flag < 0 ? named : row.cells[flag].textContent ? [row.cells[model]] : [];
      for (const cell of due)
        if (!cell.querySelector('.degenerate-mark')) result.unmarked.push(where(cell) + ': ' + cell.innerText);
    }
  }
  result.marked = document.querySelectorAll('.degenerate-mark').length;
  document.body.setAttribute('data-probe', JSON.stringify(result));
});</script>"""


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The nine models, DEGENERATE's maps all zero, ResNets also at the resolution-matched layer,
    with baselines; every figure the analysis draws kept by file name."""
    root = tmp_path_factory.mktemp("browser") / "study"
    study = SyntheticStudy(root, rng_seed=3)
    for model in MODELS:
        study.run(model, 0, all_zero=model in DEGENERATE, matched=True)
    study.baselines()
    drawn = {}
    save = figures._save

    def keep(figure, path):
        drawn[path.name] = figure
        return save(figure, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(figures, "_save", keep)
        path = report.analyze(StudyStore(root), config_for(MODELS, [0]))
    probe = path.with_name("probe.html")
    labels = json.dumps([figures.label(m) for m in DEGENERATE])
    probe.write_text(path.read_text().replace("</body>", PROBE % {"labels": labels} + "</body>"))
    return SimpleNamespace(probe=probe, figures=drawn, measured={})


# Chromium's window is at least 500 px wide: the page is shown in a frame of the width under test,
# which is its window (innerWidth, media queries); the frame's probe result is copied out to be dumped.
FRAME = """<!DOCTYPE html><html><body style='margin:0'>
<iframe id='page' src='%(page)s' style='width:%(width)dpx;height:900px;border:0'></iframe>
<script>window.addEventListener('load', () => document.body.setAttribute('data-probe',
  document.getElementById('page').contentDocument.body.getAttribute('data-probe')));</script></body></html>"""


def _measure(rendered, width: int) -> dict:
    if width not in rendered.measured:
        frame = rendered.probe.with_name(f"frame{width}.html")
        frame.write_text(FRAME % {"page": rendered.probe.name, "width": width})
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                              "--window-size=1500,1000", "--dump-dom", frame.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        found = re.search(r'data-probe="([^"]*)"', dom)
        assert found, "the probe did not run:\n" + dom[-2000:]
        rendered.measured[width] = json.loads(html.unescape(found.group(1)))
    return rendered.measured[width]


@pytest.mark.parametrize("width", WIDTHS)
def test_no_element_is_wider_than_the_window(rendered, width):
    measured = _measure(rendered, width)
    assert measured["viewport"] == "width=device-width, initial-scale=1"
    assert measured["scroll"] <= measured["inner"] == width, measured
    assert measured["wide"] == [] and measured["wideOpen"] == [], measured


@pytest.mark.parametrize("width", WIDTHS)
def test_numbers_never_wrap(rendered, width):
    assert _measure(rendered, width)["wrappedNumbers"] == []


def test_on_a_phone_every_table_column_is_at_least_one_word_wide(rendered):
    assert _measure(rendered, 390)["splitWords"] == []


def test_long_tables_are_folded_and_the_papers_every_model_tables_say_what_they_are(rendered):
    tables = _measure(rendered, 1000)["tables"]
    long = [t for t in tables if t["rows"] > COLLAPSE_ROWS]
    assert long and all(t["folded"] for t in long), long  # stability, beats_prior, ladder
    paper = [t for t in tables if t["id"].endswith("_paper_tukey")]
    assert len(paper) >= 2 and all(t["caption"].startswith(PAPER_ONLY) for t in paper), paper


def test_degenerate_map_sets_are_marked_in_every_table(rendered):
    measured = _measure(rendered, 1400)
    assert measured["unmarked"] == [] and measured["marked"] > 0


def test_every_figure_text_is_at_least_9_px_at_1400_px(rendered):
    """Text size on screen: points x dpi/72 x the scale the page shows the PNG at."""
    images = {i["file"]: i for i in _measure(rendered, 1400)["images"]}
    assert set(images) == set(rendered.figures) and len(images) >= 8
    for name, figure in rendered.figures.items():
        shown = images[name]["shown"] / images[name]["natural"]
        smallest = min(t.get_fontsize() for t in _texts(figure))
        assert smallest * figures.DPI / 72 * shown >= SMALLEST_TEXT_PX, (name, smallest, shown)


def test_no_figure_title_overlaps_another_or_a_panel(rendered):
    for name, figure in rendered.figures.items():
        renderer = FigureCanvasAgg(figure).get_renderer()  # pyplot.close left the figure a bare canvas
        figure.draw_without_rendering()
        titles = [t for t in [getattr(figure, "_suptitle", None)] + [ax.title for ax in figure.axes]
                  if t is not None and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in titles]
        for a, b in itertools.combinations(range(len(titles)), 2):
            assert not boxes[a].overlaps(boxes[b]), (name, titles[a].get_text(), titles[b].get_text())
        for title, box in zip(titles, boxes):
            for ax in figure.axes:
                assert not box.overlaps(ax.get_window_extent(renderer)), (name, title.get_text())


def _texts(figure) -> list[matplotlib.text.Text]:
    figure.draw_without_rendering()
    return [t for t in figure.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def test_cross_references_link_to_what_they_name_in_the_direction_they_say(rendered):
    links = _measure(rendered, 1000)["links"]
    assert all(link["found"] for link in links), links
    assert any(link["text"] == "the table below" for link in links)
    for link in links:
        if link["text"].endswith(("below", "above")):
            assert link["down"] == link["text"].endswith("below"), link


def test_the_summary_is_above_the_first_table_and_says_what_was_left_out(rendered):
    measured = _measure(rendered, 1400)
    assert measured["summaryTop"] < measured["tableTop"]
    assert "Classifiers that rank above chance" in measured["summaryText"]  # the summary's wording since b74c353
    assert "VGG16 (seed 0, gradcam): 60 of 60 maps are all-zero or constant" in measured["summaryText"]
