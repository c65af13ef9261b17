"""Visualise grounding for one sample: patch-similarity heatmaps and a coloured caption.

- `overlay_png` blends a token's per-patch evidence map (a g x g grid of ViT patches, given
  flat in row-major order or as [g, g]) over the image and writes a PNG. The colour's opacity
  grows with the score, so well-supported patches stand out and the rest stays readable. The
  colours run red (least support) -> yellow -> green (most), like the caption's, and a colour
  bar under the image (when labelled) gives the values and what they are.
- `caption_html` writes a self-contained HTML page (inline CSS and JS, no external resources,
  relative image paths so it works opened from disk): each token is coloured by its grounding
  logit (sigmoid: red = ungrounded -> green = grounded), tokens without a score stay plain,
  flagged tokens get a wavy red underline, and clicking a token shows its heatmap PNG.
- `sample_page` writes both for one sample into OUT_DIR/NAME/.
"""

from __future__ import annotations

import html
import math
import os
from urllib.parse import quote

import numpy as np
from PIL import Image

TITLE_PX = 24                    # height of the title strip above the image
COLOUR_BAR_PX = 62               # height of the colour-bar strip below it
HEATMAP_CMAP = "RdYlGn"          # red = least support -> green = most, as in the caption
ALPHA_MIN = 0.15                 # colour opacity at the map's minimum ...
# ... and at its maximum: `alpha` argument of overlay_png (default 0.6)

# Red -> yellow -> green stops for the caption colours (light enough for black text).
_STOPS = ((248, 105, 107), (255, 235, 132), (99, 190, 123))

# What a grounding head's per-patch evidence is (`GroundingHead.patch_scores`): the value a
# heatmap plots, by head type. A token's own score is calibrated from the maximum (similarity,
# learned) or a smooth maximum (cross_attention) of these over the patches.
PATCH_EVIDENCE = {
    "similarity": "cosine of token and patch, mean over layers (unitless, -1 to 1)",
    "learned": "cosine of projected token and patch, mean over layers (-1 to 1)",
    "cross_attention": "attention logit token to patch, mean of heads and layers (unitless)",
}
PATCH_EVIDENCE_DEFAULT = "per-patch grounding evidence (unitless)"


# ---------------------------------------------------------------------------- heatmap PNG

def _load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _grid(patch_scores) -> np.ndarray:
    """Patch scores as a [g, g] float array; ValueError if not square or not finite."""
    s = np.asarray(patch_scores, dtype=np.float64)
    if s.ndim == 1:
        k = s.shape[0]
        g = math.isqrt(k)
        if k == 0 or g * g != k:
            raise ValueError(f"patch_scores has K={k} entries, which is not a perfect square")
        s = s.reshape(g, g)
    elif s.ndim != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
        raise ValueError(f"patch_scores must be [K] or [g, g], got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("patch_scores contains non-finite values")
    return s


def _title_strip(title: str, width: int) -> np.ndarray:
    """[TITLE_PX, width, 3] uint8 white strip with `title` centred, drawn by matplotlib (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, TITLE_PX / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, title, ha="center", va="center", fontsize=10, parse_math=False)
    canvas.draw()
    strip = np.asarray(canvas.buffer_rgba())[..., :3]
    if strip.shape[:2] != (TITLE_PX, width):                 # rounding of inches -> pixels
        strip = np.asarray(Image.fromarray(strip).resize((width, TITLE_PX)))
    return strip


def _tick(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.4g}"


def _colour_bar_strip(label: str, width: int, lo: float, hi: float, cmap: str) -> np.ndarray:
    """[COLOUR_BAR_PX, width, 3] uint8 white strip: a horizontal colour bar over [lo, hi]
    with its values at both ends and the middle, and `label` (what the values are) under it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width / dpi, COLOUR_BAR_PX / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    margin = min(0.04, 6 / width)
    ax = fig.add_axes((margin, 0.62, 1 - 2 * margin, 0.26))
    ax.imshow(np.linspace(0.0, 1.0, 256)[None, :], aspect="auto", cmap=cmap, vmin=0, vmax=1,
              extent=(0.0, 1.0, 0.0, 1.0))
    ax.set_yticks([])
    ticks = [(0.0, lo, "left"), (0.5, (lo + hi) / 2, "center"), (1.0, hi, "right")]
    if hi <= lo:                                  # a flat map: one value, all of one colour
        ticks = [(0.0, lo, "left")]
    ax.set_xticks([t for t, _, _ in ticks])
    ax.set_xticklabels([_tick(v) for _, v, _ in ticks], fontsize=7)
    for text, (_, _, ha) in zip(ax.get_xticklabels(), ticks):
        text.set_horizontalalignment(ha)
    ax.tick_params(axis="x", length=2, pad=1)
    text = fig.text(0.5, 0.03, label, ha="center", va="bottom", fontsize=7, parse_math=False,
                    linespacing=1.1)
    size = 7.0
    while text.get_window_extent(canvas.get_renderer()).width > width - 8 and size > 3:
        size *= 0.92                              # a long label shrinks to fit the width
        text.set_fontsize(size)
    canvas.draw()
    strip = np.asarray(canvas.buffer_rgba())[..., :3]
    if strip.shape[:2] != (COLOUR_BAR_PX, width):         # rounding of inches -> pixels
        strip = np.asarray(Image.fromarray(strip).resize((width, COLOUR_BAR_PX)))
    return strip


def overlay_png(image, patch_scores, out_path: str, size: int | None = None,
                title: str | None = None, vmin=None, vmax=None, *,
                cmap: str = HEATMAP_CMAP, alpha: float = 0.6,
                colour_bar: str | None = None) -> str:
    """Blend the patch map over the image (resized to size x size, default: kept) and write a
    PNG to out_path (parent folders created); returns out_path.

    The map is scaled to [0, 1] over [vmin, vmax] (default: its own min and max), upsampled
    (nearest: one block per patch) to the image, coloured with `cmap` and blended with an
    opacity from ALPHA_MIN (lowest score) to `alpha` (highest). A title, when given, is drawn
    in a white strip above the image; `colour_bar`, when given, labels a colour bar over
    [vmin, vmax] in a strip below it (COLOUR_BAR_PX high; say what the values are, e.g. an
    entry of PATCH_EVIDENCE).
    """
    import matplotlib

    grid = _grid(patch_scores)
    img = _load_image(image)
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    lo = float(grid.min()) if vmin is None else float(vmin)
    hi = float(grid.max()) if vmax is None else float(vmax)
    if lo > hi:
        raise ValueError(f"vmin ({lo}) > vmax ({hi})")
    norm = np.clip((grid - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(grid)

    w, h = img.size
    up = np.asarray(Image.fromarray(norm.astype(np.float32), mode="F")
                    .resize((w, h), Image.NEAREST))                   # [h, w] in [0, 1]
    colour = matplotlib.colormaps[cmap](up)[..., :3] * 255.0
    a = (ALPHA_MIN + (alpha - ALPHA_MIN) * up)[..., None]
    out = (1.0 - a) * np.asarray(img, dtype=np.float64) + a * colour
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if title:
        out = np.concatenate([_title_strip(title, w), out], axis=0)
    if colour_bar:
        out = np.concatenate([out, _colour_bar_strip(colour_bar, w, lo, hi, cmap)], axis=0)

    parent = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(parent, exist_ok=True)
    Image.fromarray(out).save(out_path, format="PNG")
    return out_path


# ---------------------------------------------------------------------------- caption HTML

def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _colour(p: float) -> str:
    """CSS rgb() on the red (p=0) -> yellow (0.5) -> green (1) scale."""
    lo, hi, t = (_STOPS[0], _STOPS[1], p * 2) if p < 0.5 else (_STOPS[1], _STOPS[2], p * 2 - 1)
    r, g, b = (round(c0 + (c1 - c0) * t) for c0, c1 in zip(lo, hi))
    return f"rgb({r}, {g}, {b})"


def _href(path: str | None, base_dir: str) -> str | None:
    """Path relative to the HTML file's folder, as a URL path (forward slashes, quoted)."""
    if path is None:
        return None
    if os.path.isabs(path):
        path = os.path.relpath(path, base_dir)
    return quote(path.replace(os.sep, "/"), safe="/")


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.main { display: flex; gap: 2em; align-items: flex-start; }
.caption { flex: 1; max-width: 40em; font-size: 1.2em; line-height: 1.9;
           white-space: pre-wrap; font-family: Menlo, Consolas, monospace; }
.tok { border-radius: 3px; cursor: pointer; }
.tok.has-map:hover { outline: 1px solid #555; }
.tok.sel { outline: 2px solid #000; }
.tok.flag { text-decoration: underline wavy #c00; text-decoration-thickness: 2px; }
.tok.flag::after { content: "!"; color: #c00; font-size: 0.7em; font-weight: bold;
                   vertical-align: super; }
.view img { max-width: 448px; display: block; border: 1px solid #ccc; }
#view-label { font-size: 0.9em; color: #555; margin-top: 0.3em; white-space: pre; }
.legend { margin-top: 1.5em; font-size: 0.85em; color: #444; }
.legend .bar { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
               background: linear-gradient(to right, %s, %s, %s); }
.legend .bar.heat { background: linear-gradient(to right, %s, %s, %s); }
.legend span { margin-right: 1.5em; }
"""

_JS = """
(function () {
  var view = document.getElementById("view"), label = document.getElementById("view-label");
  var plain = view.getAttribute("data-plain"), current = null;
  function show(src, text) {
    if (src) { view.src = src; view.style.display = "block"; }
    else { view.removeAttribute("src"); view.style.display = "none"; }
    label.textContent = text;
  }
  document.querySelectorAll(".caption .tok").forEach(function (el) {
    el.addEventListener("click", function () {
      if (current) current.classList.remove("sel");
      if (current === el) { current = null; show(plain, ""); return; }
      current = el; el.classList.add("sel");
      var map = el.getAttribute("data-heatmap");
      var text = JSON.stringify(el.textContent) + "  " + el.title;
      show(map || plain, map ? text : text + "  (no heatmap)");
    });
  });
  show(plain, "");
})();
"""


def _heat_css(p: float) -> str:
    """CSS rgb() of HEATMAP_CMAP at p in [0, 1] (the heatmaps' legend)."""
    import matplotlib

    r, g, b = (round(c * 255) for c in matplotlib.colormaps[HEATMAP_CMAP](p)[:3])
    return f"rgb({r}, {g}, {b})"


def _colour_bar_label(evidence: str) -> str:
    return f"{evidence}\nred: least support for the token, green: most (this map's range)"


def _check_len(name: str, values, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but tokens has {n}")


def caption_html(tokens: list[str], scores: list[float | None], out_path: str,
                 heatmaps: list[str | None] | None = None, flagged: list[bool] | None = None,
                 title: str = "", image: str | None = None,
                 threshold: float | None = None,
                 evidence: str = PATCH_EVIDENCE_DEFAULT) -> str:
    """Write the caption page to out_path (parent folders created); returns out_path.

    scores are grounding logits (None: not scored). heatmaps/image are paths relative to the
    HTML file's folder (absolute ones are made relative). flagged marks likely hallucinated
    tokens; when it is None and `threshold` (a logit) is given, scored tokens below it are
    flagged. The threshold is also shown in the legend, and so, when there are heatmaps, are
    their colours and what they plot (`evidence`, e.g. an entry of PATCH_EVIDENCE).
    """
    n = len(tokens)
    _check_len("scores", scores, n)
    _check_len("heatmaps", heatmaps, n)
    _check_len("flagged", flagged, n)
    for i, s in enumerate(scores):
        if s is not None and not math.isfinite(s):
            raise ValueError(f"score of token {i} is not finite: {s}")
    if flagged is None:
        flagged = [threshold is not None and s is not None and s < threshold for s in scores]
    base = os.path.dirname(os.path.abspath(out_path))

    spans = []
    for i, (tok, s) in enumerate(zip(tokens, scores)):
        classes, attrs = ["tok"], [f'data-i="{i}"']
        if s is None:
            attrs.append('title="no score"')
        else:
            p = _sigmoid(float(s))
            attrs.append(f'title="logit {float(s):.3f}, p = {p:.3f}"')
            attrs.append(f'style="background-color: {_colour(p)}"')
        href = _href(heatmaps[i], base) if heatmaps is not None else None
        if href is not None:
            classes.append("has-map")
            attrs.append(f'data-heatmap="{html.escape(href)}"')
        if flagged[i]:
            classes.append("flag")
        spans.append(f'<span class="{" ".join(classes)}" {" ".join(attrs)}>'
                     f'{html.escape(tok)}</span>')

    plain = _href(image, base)
    legend = ['<span>ungrounded <span class="bar"></span> grounded (sigmoid of logit)</span>',
              '<span><span class="tok">plain</span> = no score</span>',
              '<span><span class="tok flag">flagged</span> = likely hallucinated</span>']
    if threshold is not None:
        legend.append(f"<span>threshold: logit {threshold:.3f} "
                      f"(p = {_sigmoid(float(threshold)):.3f})</span>")
    if heatmaps is not None and any(h is not None for h in heatmaps):
        legend.append("<span>heatmap of the clicked word: least support "
                      '<span class="bar heat"></span> most, in '
                      f"{html.escape(evidence)}; values on the colour bar under each map"
                      "</span>")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title or 'caption')}</title>",
        "<style>" + _CSS % (tuple(_colour(p) for p in (0.0, 0.5, 1.0))
                            + tuple(_heat_css(p) for p in (0.0, 0.5, 1.0))) + "</style>",
        "</head><body>",
        f"<h2>{html.escape(title)}</h2>" if title else "",
        '<div class="main">',
        '<div class="caption">' + "".join(spans) + "</div>",
        '<div class="view"><img id="view" alt="" '
        f'data-plain="{html.escape(plain or "")}"><div id="view-label"></div></div>',
        "</div>",
        '<div class="legend">' + "".join(legend) + "</div>",
        "<script>" + _JS + "</script>",
        "</body></html>",
        "",
    ])
    os.makedirs(base, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(page)
    return out_path


# ---------------------------------------------------------------------------- one sample

def sample_page(out_dir: str, name: str, image, tokens, scores, patch_scores,
                flagged=None, title="", size=None,
                evidence: str = PATCH_EVIDENCE_DEFAULT) -> str:
    """Write OUT_DIR/NAME/ with image.png, heatmap_NNNN.png for each token with patch scores
    (patch_scores: per token a [K] / [g, g] array or None; or None for no heatmaps) and
    index.html; returns the HTML path. Each heatmap has a colour bar labelled with
    `evidence`: what the patch scores are (PATCH_EVIDENCE[head type])."""
    n = len(tokens)
    _check_len("scores", scores, n)
    _check_len("patch_scores", patch_scores, n)
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    img = _load_image(image)
    if size is not None:
        img = img.resize((size, size), Image.BICUBIC)
    img.save(os.path.join(folder, "image.png"))

    heatmaps: list[str | None] = [None] * n
    for i, ps in enumerate(patch_scores if patch_scores is not None else [None] * n):
        if ps is None:
            continue
        label = f"{i}: {tokens[i]!r}"
        if scores[i] is not None:
            label += f"  logit {float(scores[i]):.2f}, p = {_sigmoid(float(scores[i])):.2f}"
        heatmaps[i] = f"heatmap_{i:04d}.png"
        overlay_png(img, ps, os.path.join(folder, heatmaps[i]), title=label,
                    colour_bar=_colour_bar_label(evidence))
    return caption_html(tokens, scores, os.path.join(folder, "index.html"), heatmaps=heatmaps,
                        flagged=flagged, title=title, image="image.png", evidence=evidence)
