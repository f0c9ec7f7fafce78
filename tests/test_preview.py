"""The preview (pipelines/preview.py): overlays where the masks are and nowhere else, a page that
references only files it wrote, the visual prompts the captioner saw, and a real headless
Chromium screenshot of the page that is not blank."""
from __future__ import annotations

import html
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotators.caption import visual_prompts as vp
from annotators.segment import masks as rle
from pipelines import preview
from schemas import region_provenance
from tests.conftest import build, records
from tests.fault_server import FaultConfig, serve_faults
from tests.test_card_quality import FLAG_REASON, KEPT_REASON, add_verdicts, without_verdict_columns


def test_overlay_tints_masks_only_in_distinct_colours() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    outer = np.zeros((40, 50), bool)
    outer[5:30, 5:40] = True
    inner = np.zeros((40, 50), bool)
    inner[10:20, 10:20] = True
    colours = [preview.colour(0), preview.colour(1)]
    out = preview.overlay_masks(rgb, [(outer, colours[0]), (inner, colours[1])])
    assert np.array_equal(out[~outer], rgb[~outer])                   # nothing outside the masks
    assert (out[outer] != rgb[outer]).any(axis=-1).mean() > 0.95      # tinted inside
    for mask, shown, rgb_colour in ((inner, inner, colours[1]), (outer, outer & ~inner, colours[0])):
        edge = vp.contour_mask(mask, 1)
        body = shown & ~edge                      # where this mask is on top, inside its outline
        expected = np.rint(0.5 * rgb[body] + 0.5 * np.asarray(rgb_colour)).astype(np.uint8)
        assert np.array_equal(out[body], expected)
        assert (out[edge] == rgb_colour).all()     # the outline, in the mask's own colour
    assert len({preview.colour(i) for i in range(64)}) == 64


class _Refs(HTMLParser):
    """Every src/href in a page, and whether it links anything external."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small default-annotator dataset with its preview."""
    tmp = tmp_path_factory.mktemp("preview")
    out, _ = build(tmp, "synthetic://6?size=96", config={
        "shards": {"samples_per_shard": 4}, "segmenter": {"name": "classical", "work_side": 96}})
    assert preview.main([str(out), "--n", "5"]) == 0
    return out


def _page_refs(out: Path) -> _Refs:
    parser = _Refs()
    parser.feed((out / "preview" / "index.html").read_text())
    return parser


def test_page_references_only_files_it_wrote(built: Path) -> None:
    refs = _page_refs(built)
    assert refs.refs and "link" not in refs.tags
    for ref in refs.refs:
        assert not re.match(r"^[a-z]+:|^//", ref), f"external reference {ref}"
        assert (built / "preview" / ref).is_file(), ref
    html = (built / "preview" / "index.html").read_text()
    assert "<script src" not in html and "@import" not in html and "url(http" not in html
    assert html.count('<article class="sample') == 5
    assert len(list((built / "preview").glob("contact-*.png"))) == 1


def test_mask_overlays_match_the_shards(built: Path) -> None:
    """Each pixel overlay differs from the stored image exactly where the record's masks are."""
    shown = 0
    for key, record in records(built).items():
        path = built / "preview" / "images" / f"{key}.pixel.png"
        if not path.exists():
            continue
        shown += 1
        overlay = np.asarray(Image.open(path).convert("RGB"))
        stored = np.asarray(Image.open(io.BytesIO(_image_bytes(built, record))).convert("RGB"))
        union = np.zeros(stored.shape[:2], bool)
        for region in record["regions"]:
            if region["level"] == "pixel":
                union |= rle.decode(region["mask"])
        assert union.any()
        assert np.array_equal(overlay[~union], stored[~union]), key
        changed = (overlay != stored).any(axis=-1)
        assert changed[union].mean() > 0.9, key
        boxed = np.asarray(Image.open(built / "preview" / "images" / f"{key}.region.png").convert("RGB"))
        assert (boxed != stored).any(), "box outlines drawn"
    assert shown == 5


def _image_bytes(out: Path, record: dict[str, Any]) -> bytes:
    import tarfile

    name = f"{record['key']}.{record['image']['format']}"
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()
    raise KeyError(name)


def _articles(page: str) -> dict[str, str]:
    """Each sampled image's <article> by key."""
    found = re.finditer(r'<article class="sample[^"]*" id="([^"]+)">.*?</article>', page, re.S)
    return {m.group(1): m.group(0) for m in found}


def test_verdicts_flags_and_rejected_regions(built: Path, tmp_path: Path) -> None:
    """Each region's verdict and reason and its consistency score; flagged regions marked (and
    opened); the regions the judge or the consistency filter dropped listed under their image with
    the reason; model text escaped."""
    out = tmp_path / "judged"
    shutil.copytree(built, out)
    judged = add_verdicts(out)
    assert preview.read_flagged(out) == {key: 1 for key in {*judged.flagged, *judged.consistency_flagged}}
    n = len(records(out))
    preview.build_preview(out, n=n)
    page = (out / "preview" / "index.html").read_text()
    articles = _articles(page)
    assert len(articles) == n
    flag_label = '<span class="flag">flagged</span>'
    for key, article in articles.items():
        ids = re.findall(r'<li class="node lv-\w+ flagged"><details open><summary>'   # flagged nodes open
                         rf'<span class="sw"[^>]*></span><b>([^<]+)</b> <span class="lv">\w+</span> {flag_label}',
                         article)
        assert ids == [r for r in (judged.flagged.get(key), judged.consistency_flagged.get(key)) if r], key
        rejected = re.findall(r'<li><b>([^<]+)</b> <span class="flag">dropped by the (\w+)</span> '
                              r'<code>(\w+)</code>: <span class="reason">(.*?)</span></li>', article, re.S)
        expected = sorted((region_id, preview.REJECTED[reason], reason, html.escape(detail))
                          for region_id, reason, detail in judged.dropped.get(key, []))
        assert rejected == expected, key
        marked = bool(ids or rejected)
        assert ('has-flags' in article.split(">", 1)[0]) == marked, key
    assert page.count(flag_label) == 2
    assert page.count(f'judge: <b>kept</b> — <span class="reason">{KEPT_REASON}</span>') == judged.kept + n
    flagged_reason = html.escape(FLAG_REASON)     # "&lt;script&gt;", the newline kept (pre-wrap)
    assert page.count(f'judge: <b>flagged</b> — <span class="reason">{flagged_reason}</span>') == 1
    assert len(re.findall(r'<p class="verdict \w+">consistency \d\.\d{3}', page)) == len(judged.scores)
    assert page.count("consistency 0.012 — <b>flagged</b>: below the threshold") == 1
    assert "<script>alert" not in page and "<b>bold</b>" not in page
    assert "2 regions flagged, 4 rejected (judge, consistency)" in page


def test_datasets_without_verdicts_show_none(built: Path, tmp_path: Path) -> None:
    articles = "".join(_articles((built / "preview" / "index.html").read_text()).values())
    assert articles and 'class="verdict' not in articles and 'class="rejected"' not in articles
    assert "has-flags" not in articles and 'class="flag"' not in articles
    old = tmp_path / "old"                  # an index written before the verdict columns
    shutil.copytree(built, old)
    without_verdict_columns(old)
    assert preview.read_flagged(old) == {}
    assert preview.main([str(old), "--n", "3"]) == 0
    assert _articles((old / "preview" / "index.html").read_text()).keys() <= records(old).keys()


@pytest.mark.slow
def test_prompts_and_failures_of_a_vllm_build(tmp_path: Path) -> None:
    """Prompt images are what annotators.caption.visual_prompts renders for the program's specs; failed
    regions and failed inputs are on the page, marked for the failure filter."""
    config = FaultConfig(latency_s=0.001, fault_rate=0.15, seed=3, mix={"refusal": 1, "http_400": 1})
    with serve_faults(config) as server:
        captioner = {"name": "vllm", "model": "fake-vlm", "program": "longgrit",
                     "endpoints": [server.base_url],
                     "client": {"timeout_s": 2.0, "max_retries": 1, "backoff_base_s": 0.01}}
        # 12 inputs: about half of them lose their image-level text to a fault, and which half
        # depends on the order requests reach the server; with 6, one survivor in ten runs
        out, manifest = build(tmp_path, "synthetic://12?size=96", config={
            "segmenter": {"name": "given"}, "regions": {"max_regions": 4, "min_area_frac": 0.0},
            "shards": {"samples_per_shard": 4}, "captioner": captioner})
    assert manifest["counts"]["region_failures_by_reason"], manifest["counts"]
    preview.build_preview(out, n=12)
    html = (out / "preview" / "index.html").read_text()
    assert re.search(r'<article class="sample[^"]*\bhas-failures\b', html)
    if manifest["counts"]["region_failures_by_reason"].get("caption/judge_rejected"):
        # the fault server's judge rejects some regions: listed with the judge's reason
        assert re.search(r'<span class="flag">dropped by the judge</span> <code>judge_rejected</code>', html)
    checked = 0
    for key, record in records(out).items():
        rgb = np.asarray(Image.open(io.BytesIO(_image_bytes(out, record))).convert("RGB"))
        for region in record["regions"]:
            for spec in region_provenance(record, region)["captioner"]["visual_prompts"][region["level"]]:
                path = out / "preview" / "prompts" / key / f"{region['id']}.{spec['name']}.png"
                mask = rle.decode(region["mask"]) if region["mask"] else None
                expected = vp.render(spec["kind"], rgb, mask, region["bbox"], **spec["params"])
                assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected)), path
                checked += 1
    assert checked > 4
    assert "used by: caption" in html and "used by: judge, context" in html
    if manifest["counts"]["failed"]:
        assert html.count("<tr>") > manifest["counts"]["failed"]


# --------------------------------------------------------------------------- Chromium


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing; skips only when no package
    registry can be reached (or there is no apt-get)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no apt-get to install it")
    lock = Path(os.environ.get("TMPDIR", "/tmp")) / "multigran-chromium-install.lock"
    command = ("flock 9; command -v chromium || { apt-get update -q && "
               "DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }")
    run = subprocess.run(["bash", "-c", f"exec 9>{lock}; {command}"], capture_output=True, text=True,
                         timeout=900, check=False)
    log = run.stdout + run.stderr
    unreachable = re.search(r"Temporary failure resolving|Could not resolve|Unable to locate package chromium"
                            r"|Failed to fetch|Network is unreachable", log)
    if run.returncode != 0 and unreachable:
        pytest.skip(f"chromium could not be installed: no package registry ({unreachable.group(0)})")
    assert run.returncode == 0, f"apt-get install chromium failed:\n{log[-3000:]}"
    found = shutil.which("chromium")
    assert found, log[-3000:]
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_headless_chromium_screenshot_is_not_blank(built: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    shot = tmp_path / "preview.png"
    page = (built / "preview" / "index.html").resolve()
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                          "--window-size=1280,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-3000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (1600, 1280)
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"only {len(colours)} colours: blank page?"
    header = image[:40].reshape(-1, 3).mean(axis=0)
    assert header.max() < 80, f"the dark page header is not drawn ({header})"
    # the overlays (96 px images drawn 400 px wide) show the masks' outlines in palette colours
    body = image[120:].reshape(-1, 3).astype(int)
    drawn = [c for c in preview.PALETTE[:6] if (np.abs(body - np.asarray(c)).max(axis=1) <= 8).sum() > 20]
    assert len(drawn) >= 2, "mask outline colours missing from the screenshot"
    shutil.copy(shot, built / "preview" / "screenshot.png")
