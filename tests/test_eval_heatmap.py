"""Heatmap PNGs and the coloured-caption HTML page (jaxground.eval.heatmap)."""

import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from jaxground.eval import heatmap


def _image(w=96, h=96, seed=0):
    """Mid-grey image with mild noise, so no colour is favoured by the blend."""
    rng = np.random.default_rng(seed)
    arr = np.clip(128 + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _patch_diff(a, b, g):
    """[g, g] mean abs difference of two same-size RGB images, per patch."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean(-1)
    h, w = d.shape
    return np.array([[d[r * h // g:(r + 1) * h // g, c * w // g:(c + 1) * w // g].mean()
                      for c in range(g)] for r in range(g)])


def _hot_map(g, hot, low=0.1, high=0.9):
    m = np.full(g * g, low)
    m[hot] = high
    return m


# ---------------------------------------------------------------------------- overlay_png

@pytest.mark.parametrize("g,hot", [(3, 5), (4, 2), (4, 13)])
def test_overlay_hot_patch_changes_most(tmp_path, g, hot):
    img = _image()
    out = heatmap.overlay_png(img, _hot_map(g, hot), str(tmp_path / "a" / "b" / "m.png"))
    assert out == str(tmp_path / "a" / "b" / "m.png")         # parent folders created
    png = Image.open(out).convert("RGB")
    assert png.size == img.size
    diff = _patch_diff(png, img, g)
    assert np.argmax(diff) == hot
    assert diff.flat[hot] > 2 * np.delete(diff.ravel(), hot).max()


def test_overlay_non_square_image_and_grid_input(tmp_path):
    img = _image(w=120, h=60)
    grid = _hot_map(3, 1).reshape(3, 3)                      # [g, g] input, hot at row 0 col 1
    png = Image.open(heatmap.overlay_png(img, grid, str(tmp_path / "m.png"))).convert("RGB")
    assert png.size == (120, 60)
    assert np.argmax(_patch_diff(png, img, 3)) == 1
    flat = Image.open(heatmap.overlay_png(img, grid.ravel(), str(tmp_path / "f.png")))
    assert np.array_equal(np.asarray(flat.convert("RGB")), np.asarray(png))


def test_overlay_resize_title_and_path_input(tmp_path):
    src = tmp_path / "src.png"
    _image(w=50, h=40).save(src)
    m = _hot_map(2, 3)
    plain = Image.open(heatmap.overlay_png(str(src), m, str(tmp_path / "p.png"), size=64))
    assert plain.size == (64, 64)
    titled = Image.open(heatmap.overlay_png(str(src), m, str(tmp_path / "t.png"), size=64,
                                            title="3: ' dog$' p = $0.9"))
    assert titled.size == (64, 64 + heatmap.TITLE_PX)
    titled = np.asarray(titled.convert("RGB"))
    assert np.array_equal(titled[heatmap.TITLE_PX:], np.asarray(plain.convert("RGB")))
    assert (titled[:heatmap.TITLE_PX] < 128).any()          # some dark text in the strip


def test_overlay_vmin_vmax_clip(tmp_path):
    img = _image()
    m = _hot_map(2, 0, low=0.0, high=0.3)
    # With a fixed range [0, 1] both low and hot values stay far from the top of the scale.
    wide = Image.open(heatmap.overlay_png(img, m, str(tmp_path / "w.png"), vmin=0, vmax=1))
    auto = Image.open(heatmap.overlay_png(img, m, str(tmp_path / "a.png")))
    dw = _patch_diff(wide.convert("RGB"), img, 2)
    da = _patch_diff(auto.convert("RGB"), img, 2)
    assert da[0, 0] > dw[0, 0]
    with pytest.raises(ValueError):
        heatmap.overlay_png(img, m, str(tmp_path / "x.png"), vmin=1, vmax=0)


@pytest.mark.parametrize("k", [2, 8, 577])
def test_overlay_non_square_k_raises(tmp_path, k):
    with pytest.raises(ValueError, match=f"K={k}"):
        heatmap.overlay_png(_image(), np.zeros(k), str(tmp_path / "m.png"))


def test_overlay_bad_shape_raises(tmp_path):
    with pytest.raises(ValueError):
        heatmap.overlay_png(_image(), np.zeros((3, 4)), str(tmp_path / "m.png"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_overlay_non_finite_raises(tmp_path, bad):
    m = np.zeros(9)
    m[4] = bad
    with pytest.raises(ValueError, match="finite"):
        heatmap.overlay_png(_image(), m, str(tmp_path / "m.png"))
    assert not (tmp_path / "m.png").exists()


# ---------------------------------------------------------------------------- caption_html

class _Spans(HTMLParser):
    """Collects the token spans (attrs, text) and the #view image's attrs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.spans, self.view, self._cur, self._depth = [], None, None, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img" and attrs.get("id") == "view":
            self.view = attrs
        if tag == "span":
            if self._cur is not None:
                self._depth += 1
            elif "data-i" in attrs:
                self._cur = [attrs, ""]

    def handle_endtag(self, tag):
        if tag == "span" and self._cur is not None:
            if self._depth:
                self._depth -= 1
            else:
                self.spans.append(tuple(self._cur))
                self._cur = None

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[1] += data


def _parse(path):
    text = open(path, encoding="utf-8").read()
    p = _Spans()
    p.feed(text)
    return text, p


def _rgb(style):
    m = re.search(r"background-color:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style or "")
    return tuple(int(x) for x in m.groups()) if m else None


def test_caption_html_tokens(tmp_path):
    out = tmp_path / "page" / "index.html"
    maps_abs = str(tmp_path / "page" / "maps" / "t1.png")
    tokens = ["A", " <b>&", " dog", "\n", " on", " \"grass\""]
    scores = [None, 4.0, -4.0, None, 0.0, 2.0]
    heatmaps = [None, maps_abs, "maps/t2.png", None, str(tmp_path / "other" / "t4.png"), None]
    flagged = [False, False, True, False, False, False]
    path = heatmap.caption_html(tokens, scores, str(out), heatmaps=heatmaps, flagged=flagged,
                                title="Sample <1>", image=str(tmp_path / "page" / "img.png"))
    assert path == str(out)
    text, p = _parse(out)

    # escaping: the raw markup never appears, the text round-trips exactly
    assert "<b>&" not in text and "&lt;b&gt;&amp;" in text
    assert "Sample &lt;1&gt;" in text
    assert [t for _, t in p.spans] == tokens
    attrs = [a for a, _ in p.spans]

    # colours: high logit green-ish, low red-ish, 0 in between, None uncoloured
    hi, lo, mid = _rgb(attrs[1].get("style")), _rgb(attrs[2].get("style")), \
        _rgb(attrs[4].get("style"))
    assert hi[1] > hi[0] + 50 and lo[0] > lo[1] + 50
    assert mid[0] > hi[0] and mid[1] > lo[1]                # p = 0.5: yellow, between the two
    assert "style" not in attrs[0] and "style" not in attrs[3]
    assert _rgb(attrs[5]["style"]) != hi                     # colour depends on the score

    # tooltips: score and sigmoid probability
    assert "4.000" in attrs[1]["title"] and "0.982" in attrs[1]["title"]
    assert "-4.000" in attrs[2]["title"] and "0.018" in attrs[2]["title"]
    assert "0.500" in attrs[4]["title"]

    # heatmap links, relative to the page's folder
    assert attrs[1]["data-heatmap"] == "maps/t1.png"
    assert attrs[2]["data-heatmap"] == "maps/t2.png"
    assert attrs[4]["data-heatmap"] == "../other/t4.png"
    assert "data-heatmap" not in attrs[0] and "data-heatmap" not in attrs[5]
    assert p.view["data-plain"] == "img.png"

    # flags
    flags = ["flag" in a["class"].split() for a in attrs]
    assert flags == flagged

    # self-contained: inline script, no external resources
    assert "<script>" in text and "addEventListener" in text
    assert not re.search(r"(src|href)=\"(https?:)?//", text) and "<link" not in text


def test_caption_html_threshold_flags_and_legend(tmp_path):
    out = tmp_path / "t.html"
    heatmap.caption_html(["a", "b", "c"], [1.0, -1.0, None], str(out), threshold=0.5)
    text, p = _parse(out)
    assert ["flag" in a["class"].split() for a, _ in p.spans] == [False, True, False]
    assert "threshold" in text and "0.500" in text
    assert p.view["data-plain"] == ""
    # explicit flags win over the threshold
    heatmap.caption_html(["a", "b"], [1.0, -1.0], str(out), flagged=[True, False],
                         threshold=0.5)
    _, p = _parse(out)
    assert ["flag" in a["class"].split() for a, _ in p.spans] == [True, False]


@pytest.mark.parametrize("kw", [
    dict(scores=[1.0]),
    dict(scores=[1.0, 2.0], heatmaps=[None]),
    dict(scores=[1.0, 2.0], flagged=[True, False, False]),
])
def test_caption_html_length_mismatch_raises(tmp_path, kw):
    with pytest.raises(ValueError):
        heatmap.caption_html(["a", "b"], out_path=str(tmp_path / "x.html"), **kw)
    assert not (tmp_path / "x.html").exists()


def test_caption_html_non_finite_score_raises(tmp_path):
    with pytest.raises(ValueError):
        heatmap.caption_html(["a"], [float("nan")], str(tmp_path / "x.html"))


# ---------------------------------------------------------------------------- sample_page

def test_sample_page(tmp_path):
    tokens = ["A", " cat", " on", " <mat>"]
    scores = [None, 3.0, None, -2.0]
    patch = [None, _hot_map(3, 4), None, _hot_map(3, 0).reshape(3, 3)]
    html_path = heatmap.sample_page(str(tmp_path), "s1", _image(w=80, h=60), tokens, scores,
                                    patch, flagged=[False, False, False, True], title="s1",
                                    size=48)
    folder = tmp_path / "s1"
    assert html_path == str(folder / "index.html")
    assert sorted(os.listdir(folder)) == ["heatmap_0001.png", "heatmap_0003.png",
                                          "image.png", "index.html"]
    assert Image.open(folder / "image.png").size == (48, 48)
    assert Image.open(folder / "heatmap_0001.png").size == (
        48, heatmap.TITLE_PX + 48 + heatmap.COLOUR_BAR_PX)          # title, image, colour bar
    _, p = _parse(html_path)
    attrs = [a for a, _ in p.spans]
    assert [a.get("data-heatmap") for a in attrs] == [None, "heatmap_0001.png", None,
                                                      "heatmap_0003.png"]
    assert "flag" in attrs[3]["class"].split()
    assert p.view["data-plain"] == "image.png"
    # the heatmap for " cat" is hot in the centre patch
    hm = np.asarray(Image.open(folder / "heatmap_0001.png").convert("RGB"))[
        heatmap.TITLE_PX:heatmap.TITLE_PX + 48]
    base = Image.open(folder / "image.png").convert("RGB")
    assert np.argmax(_patch_diff(hm, base, 3)) == 4


def _bar_rows(png, top):
    """Rows of the strip from `top` down holding a left-to-right colour gradient: the
    colour bar's rows (indices from `top`)."""
    strip = np.asarray(png, dtype=np.float64)[top:]
    w = strip.shape[1]
    left, right = strip[:, int(w * 0.1)], strip[:, int(w * 0.9)]
    return [r for r in range(strip.shape[0])
            if left[r, 0] > left[r, 1] + 60 and right[r, 1] > right[r, 0] + 60]


def test_overlay_colour_bar_shows_scale_and_meaning(tmp_path):
    """A labelled heatmap has a colour bar under the image: red (least) -> green (most), the
    map's range at its ends, what the values are under it; the image part is unchanged."""
    img = _image(w=336, h=336)
    m = _hot_map(4, 6, low=-0.125, high=0.75)
    plain = Image.open(heatmap.overlay_png(img, m, str(tmp_path / "p.png"))).convert("RGB")
    label = heatmap.PATCH_EVIDENCE["similarity"]
    barred = Image.open(heatmap.overlay_png(img, m, str(tmp_path / "b.png"),
                                            colour_bar=label)).convert("RGB")
    assert barred.size == (336, 336 + heatmap.COLOUR_BAR_PX) and plain.size == (336, 336)
    arr = np.asarray(barred)
    assert np.array_equal(arr[:336], np.asarray(plain))
    rows = _bar_rows(barred, 336)
    assert len(rows) >= 8, "no red-to-green colour bar under the image"
    strip = arr[336:]
    below = strip[max(rows) + 1:]
    assert (below < 100).all(-1).sum() > 100                    # tick values and label text
    # The ticks and the label come from the values and the label given: change either and
    # the strip changes.
    other = np.asarray(Image.open(heatmap.overlay_png(
        img, m, str(tmp_path / "o.png"), colour_bar=heatmap.PATCH_EVIDENCE["cross_attention"]
    )).convert("RGB"))[336:]
    wider = np.asarray(Image.open(heatmap.overlay_png(
        img, m * 10, str(tmp_path / "w.png"), colour_bar=label)).convert("RGB"))[336:]
    assert not np.array_equal(other, strip) and not np.array_equal(wider, strip)
    assert "cosine" in label and "unitless" in label
    # Every head's label fits the width (no text cut at the edges), long ones shrunk to fit.
    for i, text in enumerate([*heatmap.PATCH_EVIDENCE.values(), "x" * 90]):
        s = np.asarray(Image.open(heatmap.overlay_png(
            img, m, str(tmp_path / f"l{i}.png"), colour_bar=text)).convert("RGB"))[336:]
        edges = np.concatenate([s[:, :2], s[:, -2:]], axis=1)
        assert not (edges < 100).all(-1).any(), text


def test_sample_page_heatmaps_have_colour_bars_and_legend(tmp_path):
    tokens = ["a", " ring"]
    html_path = heatmap.sample_page(str(tmp_path), "s", _image(w=64, h=64), tokens,
                                    [None, 1.5], [None, _hot_map(4, 5)], size=336,
                                    evidence=heatmap.PATCH_EVIDENCE["similarity"])
    png = Image.open(tmp_path / "s" / "heatmap_0001.png").convert("RGB")
    assert png.size == (336, heatmap.TITLE_PX + 336 + heatmap.COLOUR_BAR_PX)
    assert len(_bar_rows(png, heatmap.TITLE_PX + 336)) >= 8
    text = open(html_path, encoding="utf-8").read()
    assert "bar heat" in text and "colour bar" in text
    assert heatmap.PATCH_EVIDENCE["similarity"] in text
    # Only characters every default font has: no symbol glyphs, literal or CSS-escaped.
    assert text.isascii() and not re.search(r"content:\s*\"\\[0-9a-fA-F]", text)


def test_sample_page_length_mismatch_raises(tmp_path):
    with pytest.raises(ValueError):
        heatmap.sample_page(str(tmp_path), "s", _image(), ["a", "b"], [1.0, 2.0], [None])
