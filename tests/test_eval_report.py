"""The HTML report renders in headless Chromium with every image decoded and the Table-1 table present;
report.md and the figures are written beside it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fairdiff_ray.config import load_config
from fairdiff_ray.eval.report import table1, write_report
from fairdiff_ray.eval.run import run_evaluation
from tests._helpers_eval import standin_gen_loader, standin_score_loader, write_prompts

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Appended to a copy of the report: after load, count images that actually decoded and the table's rows.
CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const rows = [...document.querySelectorAll('table.table1 tbody tr')].map(r => r.cells[0].textContent);
  const head = [...document.querySelectorAll('table.table1 thead th')].map(c => c.textContent);
  document.body.setAttribute('data-check', JSON.stringify({
    imgs: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    pixelated: imgs.filter(i => i.closest('figure') && i.naturalWidth >= 96).length, rows, head}));
});</script>"""


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    prompts = write_prompts(tmp / "prompts.jsonl", n=4)
    (tmp / "model").mkdir()
    (tmp / "adaptor").mkdir()
    cfg = load_config(None, [f"model.path={tmp / 'model'}", f"data.prompt_sets=[{{path: {prompts}}}]",
                             "eval.images_per_prompt=4", "eval.grid_images=3",
                             "target={gender: {classes: [female, male], probs: [0.5, 0.5]}}"])
    run_evaluation(cfg, {"debiased": str(tmp / "adaptor")}, tmp / "eval", executor="local", report=False,
                   gen_loader=standin_gen_loader, score_loader=standin_score_loader, log=lambda s: None)
    return tmp / "eval"


def test_report_files_and_markdown(eval_dir: Path) -> None:
    html_path = write_report(eval_dir)
    assert html_path == eval_dir / "report.html"
    for name in ("headline", "bias_distribution", "freq_gender", "freq_race"):
        assert (eval_dir / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (eval_dir / "report.md").read_text()
    assert "| model | bias gender | bias race | bias gender × race |" in md
    assert re.search(r"\| debiased \| [.\d]+ ± [.\d]+ \|", md)
    page = html_path.read_text()
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    summary = json.loads((eval_dir / "summary.json").read_text())
    header, rows = table1(summary)
    assert [r[0] for r in rows] == ["base", "debiased"] and header[-1] == "toy sim."


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make sysdeps installs it)")
def test_report_renders_in_headless_chromium(eval_dir: Path, tmp_path: Path) -> None:
    write_report(eval_dir)
    page = (eval_dir / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
           "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r"data-check=\"([^\"]*)\"", dom)
    assert m, f"the page did not finish loading in Chromium: {dom[:300]!r}"
    check = json.loads(m.group(1).replace("&quot;", '"'))
    n_charts = 4  # headline, bias distribution, two frequency charts
    n_grid = 4 * 2 * 3  # 4 prompts (<= 6 shown) x 2 models x grid_images
    assert check["imgs"] == n_charts + n_grid
    assert check["decoded"] == check["imgs"]  # every embedded PNG decoded
    assert check["pixelated"] == n_grid  # 32x32 images were upscaled to >= 96 px
    assert check["rows"] == ["base", "debiased"]
    assert check["head"][:4] == ["model", "bias gender", "bias race", "bias gender × race"]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1100,1600",
                    f"--screenshot={shot}", (eval_dir / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1100, 1600)
    assert len(set(im.getdata())) > 50  # rendered content, not a blank page
