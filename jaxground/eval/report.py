"""Human-readable reports of evaluation results (report.md) and grounding heatmap pages."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxground.eval import heatmap
from jaxground.utils.jsonl import read_jsonl


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pope(m: dict) -> str:
    splits = [k for k, v in m.items() if isinstance(v, dict) and "f1" in v]
    rows = [[s, m[s]["accuracy"], m[s]["precision"], m[s]["recall"], m[s]["f1"],
             m[s]["yes_ratio"], len(m[s]["missing"])] for s in splits]
    return (_table(["split", "accuracy", "precision", "recall", "F1", "yes ratio", "missing"],
                   rows) + f"\n\nMean F1 over splits: {_f(m.get('mean_f1'))}")


def _chair(m: dict) -> str:
    return _table(["CHAIR_s", "CHAIR_i", "recall", "mean length", "captions"],
                  [[m["chair_s"], m["chair_i"], m["recall"], m["mean_length"],
                    len(m.get("per_caption", []))]])


def _grounding(m: dict) -> str:
    rows = []
    for signal in ("grounding", "nll", "entropy"):
        if signal in m.get("token", {}):
            t, men = m["token"][signal], m["mention"][signal]
            rows.append([signal, t["auroc"], t["aupr"], men["auroc"], men["aupr"]])
    fl = m.get("flagging", {})
    return (_table(["signal", "token AUROC", "token AUPR (halluc.)", "mention AUROC",
                    "mention AUPR (halluc.)"], rows)
            + f"\n\n{m['tokens']} mention tokens ({m['hallucinated_tokens']} hallucinated), "
            f"{m['mentions']} mentions ({m['hallucinated_mentions']} hallucinated). "
            "AUROC: real vs hallucinated, higher score = real (grounding logit, -NLL, "
            "-entropy); AUPR: detecting hallucinated ones.\n\n"
            f"Flagging (mean grounding logit < {_f(fl.get('threshold'), 2)}): "
            f"{fl.get('flagged')} flagged, precision {_f(fl.get('precision'))}, recall "
            f"{_f(fl.get('recall'))} of {fl.get('hallucinated')} hallucinated mentions.")


def _mme(m: dict) -> str:
    rows = [[name, s["score"], s["acc"], s["acc_plus"], s["n_questions"]]
            for name, s in m["subtasks"].items()]
    return (_table(["subtask", "score", "acc", "acc+", "questions"], rows)
            + f"\n\nPerception {_f(m['perception'], 2)}, cognition {_f(m['cognition'], 2)}, "
            f"total {_f(m['total'], 2)}.")


_SECTIONS = {"pope": _pope, "chair": _chair, "grounding": _grounding, "mme": _mme}


def task_markdown(results: dict) -> str:
    decode = results.get("decode", {})
    guided = decode.get("guidance") is not None
    lines = [f"# {results['task']}{' (grounding-guided decoding)' if guided else ''}", "",
             f"- checkpoint: `{results['checkpoint']}` (step {results.get('step')})",
             f"- data: `{results['data']}`, {results['samples']} samples, "
             f"{results['failed']} failed"]
    if results.get("teacher_forced"):
        lines.append(f"- given captions scored teacher forced in {results['seconds']:.1f} s")
    elif "new_tokens" in results:
        lines.append(f"- generation: {results['seconds']:.1f} s, {results['new_tokens']} new "
                     f"tokens, {results['tokens_per_s']:.1f} tokens/s")
    if decode:
        lines.append("- decoding: " + ", ".join(f"{k}={v}" for k, v in decode.items()))
    lines += ["", _SECTIONS[results["task"]](results["metrics"]), ""]
    for page in results.get("heatmaps", []):
        lines.append(f"- heatmaps: [{page}]({page})")
    return "\n".join(lines) + "\n"


def task_summary(results: dict) -> str:
    """One line for the terminal."""
    m, task = results["metrics"], results["task"]
    if task == "pope":
        body = f"mean F1 {_f(m.get('mean_f1'))}"
    elif task == "chair":
        body = (f"CHAIR_s {_f(m['chair_s'])} CHAIR_i {_f(m['chair_i'])} "
                f"recall {_f(m['recall'])}")
    elif task == "grounding":
        body = f"token AUROC {_f(m['token'].get('grounding', {}).get('auroc'))}"
    else:
        body = f"perception {_f(m['perception'], 2)} cognition {_f(m['cognition'], 2)}"
    return f"{task}: {body} ({results['samples']} samples)"


# ---- heatmaps ---------------------------------------------------------------------------
def _image_from_pixels(pixels_chw: np.ndarray, image_processor) -> np.ndarray:
    """The [H, W, 3] uint8 image the vision tower saw (normalisation undone), so that patch
    maps line up with it exactly."""
    mean = np.asarray(image_processor.image_mean, np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, np.float32)[:, None, None]
    rgb = (pixels_chw * std + mean).transpose(1, 2, 0)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _pick(mention_sets: list[dict], n: int) -> list[int]:
    """Indices of up to n samples, those with both a real and a hallucinated mention first."""
    def rank(i):
        return (-len({m["hallucinated"] for m in mention_sets[i]["mentions"]}), i)

    return sorted(range(len(mention_sets)), key=rank)[:n]


HEATMAP_SIZE = 336  # pixels; small images (the shapes world's) are scaled up to be readable


def heatmap_pages(model, processor, samples: list[dict], coco_dir: str, settings, out: str
                  ) -> tuple[list[str], list[dict]]:
    """For `settings.heatmaps` samples (an EvalSettings; its split and its protocol's
    caption prompt are used too), an HTML page of the caption coloured by grounding, each
    object mention token clickable to show the image with that token's patch scores
    (teacher forced, mean over grounded layers). Returns the pages' paths relative to
    `out`, and examples: per mention of those captions {"image_id", "caption", "word",
    "hallucinated", "grounding", "png"} (the heatmap of the mention's first token, relative
    to `out`)."""
    from PIL import Image

    from jaxground.data.processor import open_image
    from jaxground.eval.tasks import grounding_truth, mention_samples
    from jaxground.inference.score import patch_maps, score

    usable = [s for s in samples if "error" not in s and s.get("token_ids")]
    vocab, truth = grounding_truth(coco_dir, usable, settings.split or None)
    sets = mention_samples(usable, processor.tokenizer, vocab, truth)
    config = model.config
    prompt = processor.encode(settings.resolved_protocol.caption_prompt)["input_ids"]
    pages, examples = [], []
    for i in _pick(sets, settings.heatmaps):
        s, (text, spans, mentions) = usable[i], (sets[i]["text"], sets[i]["spans"],
                                                 sets[i]["mentions"])
        ids = np.asarray([prompt + s["token_ids"]], np.int32)
        pixels = processor.pixel_values([open_image(os.path.join(coco_dir, s["image"]))])
        scores = score(model, ids, pixels, patches=True)
        patches = patch_maps(np.asarray(scores.patches)[0, len(prompt):], config)  # [N, K]
        mention_tokens = {t for m in mentions for t in m["tokens"]}
        pieces = [text[a:b] for a, b in spans]
        image = Image.fromarray(_image_from_pixels(pixels[0], processor.image_processor))
        flagged = [bool(f) and t in mention_tokens
                   for t, f in enumerate(s.get("flagged", [False] * len(pieces)))]
        hallucinated = {m["category"] for m in mentions if m["hallucinated"]}
        page = heatmap.sample_page(
            out_dir=os.path.join(out, "heatmaps"), name=str(s["image_id"]), image=image,
            # Only object mentions are coloured: the grounding loss trains no other token,
            # so other tokens' scores carry no meaning.
            tokens=pieces, scores=[g if t in mention_tokens else None
                                   for t, g in enumerate(s["grounding"])],
            patch_scores=[patches[t] if t in mention_tokens else None
                          for t in range(len(pieces))],
            flagged=flagged, size=HEATMAP_SIZE,
            evidence=heatmap.PATCH_EVIDENCE.get(config.grounding.type,
                                                heatmap.PATCH_EVIDENCE_DEFAULT),
            title=f"image {s['image_id']}: hallucinated {sorted(hallucinated) or 'none'}")
        pages.append(os.path.relpath(page, out))
        for m in mentions:
            png = os.path.join(os.path.dirname(page), f"heatmap_{m['tokens'][0]:04d}.png")
            examples.append({"image_id": s["image_id"], "caption": text.strip(),
                             "word": m["word"], "hallucinated": m["hallucinated"],
                             "grounding": m["grounding"], "png": os.path.relpath(png, out)})
    return pages, examples


# ---- the demo's report ------------------------------------------------------------------
# Its columns, in this order; a model absent from the results is left out.
DEMO_MODELS = (("ungrounded", "ungrounded (λ = 0)"),
               ("vcd", "ungrounded + VCD"),
               ("grounded", "grounded (λ = 1)"),
               ("guided", "grounded + guided"),
               ("lora", "ungrounded + LoRA grounding fine-tune"),
               ("lora_guided", "LoRA fine-tune + guided"))
# (key, label, kind); kind picks the cell format (see _cell).
DEMO_ROWS = (("chair_s", "CHAIR_s (captions with a hallucination) ↓", "fraction"),
             ("chair_i", "CHAIR_i (hallucinated mentions) ↓", "fraction"),
             ("recall", "object recall ↑", "fraction"),
             ("mean_length", "caption length (words, mean)", "words"),
             ("pope_random_f1", "POPE random F1 ↑", "fraction"),
             ("pope_popular_f1", "POPE popular F1 ↑", "fraction"),
             ("pope_adversarial_f1", "POPE adversarial F1 ↑", "fraction"),
             ("token_auroc", "token AUROC of the grounding score ↑", "fraction"),
             ("token_auroc_nll", "token AUROC of -NLL (baseline)", "fraction"),
             ("mentions", "object mentions: hallucinated / all", "mentions"),
             ("train_seconds", "training time", "seconds"))
MISSING = "—"  # a cell without a value (an em dash: in every default font)
# What a target's status reads as (plain words: no glyph a browser's fonts may lack).
STATUS = {True: "met", False: "missed", None: "n/a"}


def _number(x) -> float | None:
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _seconds(x: float) -> str:
    """262.4 -> '262 s'; from a minute on with minutes too: '262 s (4 min 22 s)'."""
    s = round(x)
    return f"{s} s" if s < 60 else f"{s} s ({s // 60} min {s % 60} s)"


def _cell(values: dict, key: str, kind: str) -> str:
    """One table cell: fractions (metrics in [0, 1]) with 3 decimals, the mean caption length
    with 1, counts and seconds as integers, MISSING where there is no value."""
    if kind == "mentions":
        bad, total = (_number(values.get(k)) for k in ("hallucinated_mentions", "mentions"))
        return MISSING if bad is None or total is None else f"{bad:.0f} / {total:.0f}"
    x = _number(values.get(key))
    if x is None:
        return MISSING
    if kind == "fraction":
        return f"{x:.3f}"
    if kind == "words":
        return f"{x:.1f}"
    if kind == "seconds":
        return f"{round(x)} s"
    return f"{x:.0f}"  # counts


def demo_models(results: dict) -> list[tuple[str, str]]:
    """(key, column label) of the models present in `results`, in DEMO_MODELS' order."""
    return [(m, label) for m, label in DEMO_MODELS if m in results]


def demo_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The demo table as text: header and rows (first cell the row's label). Rows no
    present model has a value for (e.g. POPE before it was run) are left out."""
    models = demo_models(results)
    rows = []
    for key, label, kind in DEMO_ROWS:
        cells = [_cell(results[m], key, kind) for m, _ in models]
        if any(c != MISSING for c in cells):
            rows.append([label] + cells)
    return [""] + [label for _, label in models], rows


def demo_table(results: dict) -> str:
    header, rows = demo_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _value(results: dict, model: str, key: str) -> float | None:
    return _number(results.get(model, {}).get(key))


# The token AUROC each world's demo aims at (its issue's target).
AUROC_TARGETS = {"default": 0.95, "hard": 0.9}


def demo_checks(results: dict, world: str = "default") -> list[tuple[str, bool | None, str]]:
    """The demo issue's targets: (what, met, the numbers); met is None where the results lack
    what a target compares (that model or metric was not evaluated)."""
    auroc_target = AUROC_TARGETS[world]
    def check(what, a, b, ok, nums):
        if a is None or b is None:
            return (what, None, "not evaluated")
        return (what, bool(ok(a, b)), nums(a, b))

    v = lambda m, k: _value(results, m, k)  # noqa: E731

    def chair_recall(m):
        pair = (v(m, "chair_i"), v(m, "recall"))
        return None if None in pair else pair

    return [
        check("guided CHAIR_i ≤ half the ungrounded model's",
              v("guided", "chair_i"), v("ungrounded", "chair_i"), lambda d, u: d <= 0.5 * u,
              lambda d, u: f"{d:.3f} (guided) vs {u:.3f} (ungrounded)"),
        check("guided object recall ≥ 0.9 × ungrounded",
              v("guided", "recall"), v("ungrounded", "recall"), lambda d, u: d >= 0.9 * u,
              lambda d, u: f"{d:.3f} (guided) vs {u:.3f} (ungrounded)"),
        check("grounded POPE-adversarial F1 ≥ ungrounded + 5 points",
              v("grounded", "pope_adversarial_f1"), v("ungrounded", "pope_adversarial_f1"),
              lambda g, u: g >= u + 0.05,
              lambda g, u: f"{g:.3f} (grounded) vs {u:.3f} (ungrounded), "
                           f"{100 * (g - u):+.1f} points"),
        check(f"grounded token AUROC ≥ {auroc_target:g}", v("grounded", "token_auroc"),
              auroc_target, lambda g, t: g >= t, lambda g, t: f"{g:.3f}"),
        *(check(f"{label} CHAIR_i ≤ 0.6 × ungrounded at recall ≥ 0.9 ×",
                chair_recall(m), chair_recall("ungrounded"),
                lambda l, u: l[0] <= 0.6 * u[0] and l[1] >= 0.9 * u[1],
                lambda l, u: f"CHAIR_i {l[0]:.3f} vs {u[0]:.3f}, recall {l[1]:.3f} vs "
                             f"{u[1]:.3f}")
          for m, label in (("lora", "LoRA fine-tune"), ("lora_guided", "LoRA fine-tune + guided"))
          if m in results),
        *(check("LoRA fine-tune POPE-adversarial F1 ≥ ungrounded + 5 points",
                v("lora", "pope_adversarial_f1"), v("ungrounded", "pope_adversarial_f1"),
                lambda l, u: l >= u + 0.05,
                lambda l, u: f"{l:.3f} (LoRA) vs {u:.3f} (ungrounded), "
                             f"{100 * (l - u):+.1f} points")
          for _ in [0] if "lora" in results),
    ]


def training_curves(out: str, runs: dict[str, str], path: str) -> str:
    """LM loss, grounding loss (train) and held-out grounding AUROC of each run, from its
    metrics.jsonl, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    panels = (("train", "lm_loss", "LM loss (train)"),
              ("train", "grounding_loss", "grounding loss (train)"),
              ("eval", "grounding_auroc", "grounding AUROC (held-out tokens)"))
    axes = fig.subplots(1, len(panels))
    for name, workdir in runs.items():
        rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        for ax, (split, key, title) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="o" if split == "eval" else None)
            ax.set_title(title)
            ax.set_xlabel("training step")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _contrasting(examples: list[dict]) -> list[dict]:
    """A correctly named object and a hallucinated one, from one caption when possible."""
    by_image: dict = {}
    for e in examples:
        by_image.setdefault(e["image_id"], {}).setdefault(e["hallucinated"], e)
    both = [v for v in by_image.values() if len(v) == 2]
    if both:
        return [both[0][False], both[0][True]]
    firsts = {e["hallucinated"]: e for e in reversed(examples)}
    return [firsts[k] for k in (False, True) if k in firsts]


WORLD_TITLES = {"default": "the shapes world",
                "hard": "the hard shapes world (random colours, LLaVA's recipe)"}


def _recipe(stages: dict) -> str:
    """What the hard world's shared stages did, for the report's intro."""
    v, a = stages["vision"], stages["align"]
    return (f" Both start from one checkpoint made with LLaVA-1.5's recipe at toy scale: the "
            f"vision tower pretrained CLIP-style ({v['steps']} steps, {_seconds(v['seconds'])}; "
            f"at the end an image picks its own caption among the batch's "
            f"{_f(v.get('retrieval_accuracy'), 3)} of the time and beats its hallucinated twin "
            f"{_f(v.get('beats_hallucinated_twin'), 3)}), then the projector aligned alone on "
            f"captions ({a['steps']} steps, {_seconds(a['seconds'])}, LM loss "
            f"{_f(a.get('lm_loss'), 3)}); the fine-tunes train projector + LLM, tower frozen.")


def _describe(settings: dict) -> str:
    """The paragraph under the report's title: what was trained, on what, how long."""
    hard = settings.get("world") == "hard"
    world = (f"{settings['train_images']} training images (captions: annotators' co-occurrence "
             f"bias {settings['caption_bias']:g}"
             f"{'; every shape a random colour, up to 4 per image' if hard else ''}), "
             f"{settings['heldout_images']} held-out images (faithful captions, another seed)")
    text = (f"Two tiny LLaVAs, same initialisation and data order, {settings['steps']} steps "
            f"each; {world}.")
    if settings.get("stages"):
        text += _recipe(settings["stages"])
    text += (f" Guided decoding: argmax log p + alpha * log sigmoid(grounding "
             f"logit) over the top-{settings['guidance_top_k']} candidates, alpha = "
             f"{settings['guidance']:g}, on object words and the attribute words before them.")
    vcd = settings.get("vcd")
    if vcd:
        params = (", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                            for k, v in vcd.items()) if isinstance(vcd, dict) else str(vcd))
        text += (" Ungrounded + VCD: the ungrounded model with visual contrastive decoding "
                 f"(Leng et al. 2024), {params}.")
    lora = settings.get("lora")
    if lora:
        text += (f" Ungrounded + LoRA grounding fine-tune: the ungrounded model as the base, "
                 f"frozen in {lora['quant']}, with rank-{lora['rank']} adapters (alpha "
                 f"{lora['alpha']:g}) on every linear of the LLM, trained with the grounding "
                 f"loss ({lora['steps']} steps; trainable: {lora['trainable']}).")
    return text + f" Whole demo: {_seconds(settings['seconds'])}."


def _html_table(header: list[str], table: list[list[str]]) -> str:
    import html

    esc = html.escape
    rows = "".join("<tr><th>" + esc(r[0]) + "</th>" + "".join(f"<td>{esc(c)}</td>" for c in r[1:])
                   + "</tr>\n" for r in table)
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + rows + "</table>")


def demo_report(out: str, results: dict, settings: dict) -> dict:
    """Writes OUT/results.json, OUT/curves.png, OUT/report.md and OUT/report.html.

    results: {model: metrics} for the models of DEMO_MODELS present (absent ones are left
    out; missing metrics show as MISSING); training curves are read from OUT/<model>/ for
    the trained models, grounded and ungrounded. settings: steps, train_images,
    heldout_images, caption_bias, guidance, guidance_top_k, seconds (the whole demo's), and
    optionally vcd (VCD's parameters, a dict)."""
    import html
    import json

    models = demo_models(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({m: {k: v for k, v in results[m].items()
                       if k not in ("heatmaps", "heatmap_examples")} for m, _ in models},
                  f, indent=1)
    trained = [m for m in ("grounded", "ungrounded", "lora") if m in results]
    training_curves(out, {m: os.path.join(out, m) for m in trained},
                    os.path.join(out, "curves.png"))
    world = settings.get("world", "default")
    checks = demo_checks(results, world)
    title = f"jaxground demo: grounded vs ungrounded on {WORLD_TITLES[world]}"
    compare = settings.get("compare")
    compare_md = ([] if not compare else
                  ["", f"## Beside it: the demo in {compare['folder']}", "",
                   demo_table(compare["results"])])
    heatmaps = [p for m in ("grounded", "guided") for p in results.get(m, {}).get("heatmaps", [])]
    shown = _contrasting(results.get("grounded", {}).get("heatmap_examples", []))
    intro = _describe(settings)
    heat_intro = ("Each page shows a generated caption with object words coloured by their "
                  "grounding score; click a word to see which image patches support it. In a "
                  "heatmap, red patches support the word least and green ones most; the colour "
                  "bar under it gives the values (the per-patch evidence of the grounding head) "
                  "over that map's range.")

    md = [f"# {title}", "", intro, "", demo_table(results), *compare_md, "", "## Targets", ""]
    md += [f"- **{STATUS[ok]}** — {what}: {nums}" for what, ok, nums in checks]
    md += ["", "## Training curves", "", "![training curves](curves.png)", "",
           "## Heatmaps (grounded model, held-out images)", "", heat_intro]
    for e in shown:
        kind = "hallucinated" if e["hallucinated"] else "correctly named"
        md += ["", f"**{kind}**: \"{e['word']}\" in \"{e['caption']}\" (image {e['image_id']}, "
               f"grounding logit {e['grounding']:.2f})", "", f"![{e['word']}]({e['png']})"]
    md += ["", "All pages:"] + [f"- [{p}]({p})" for p in heatmaps]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")

    esc = html.escape
    checks_html = "".join(f'<li><span class="status {STATUS[ok].replace("/", "")}">'
                          f"{STATUS[ok]}</span> {esc(what)}: {esc(nums)}</li>"
                          for what, ok, nums in checks)
    figures = "".join(
        f'<figure><img src="{esc(e["png"])}" alt="{esc(e["word"])}">'
        f'<figcaption>{"hallucinated" if e["hallucinated"] else "correctly named"}: '
        f'"{esc(e["word"])}" in "{esc(e["caption"])}" (image {esc(str(e["image_id"]))}, '
        f'grounding logit {e["grounding"]:.2f})</figcaption></figure>' for e in shown)
    links = "".join(f'<li><a href="{esc(p)}">{esc(p)}</a></li>' for p in heatmaps)
    iframe = f'<iframe src="{esc(heatmaps[0])}"></iframe>' if heatmaps else ""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th:first-child{text-align:left}"
             ".status{font-weight:bold;display:inline-block;min-width:4em}"
             ".met{color:#1a7f37}.missed{color:#c62828}.na{color:#666}"
             "figure{display:inline-block;margin:0 1em;vertical-align:top;max-width:360px}"
             "iframe{width:100%;height:640px;border:1px solid #ccc}")
    page = "\n".join([
        '<!doctype html><html><head><meta charset="utf-8">',
        f"<title>jaxground demo</title><style>{style}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{esc(intro)}</p>",
        _html_table(*demo_rows(results)),
        "" if not compare else (f"<h2>Beside it: the demo in {esc(compare['folder'])}</h2>"
                                + _html_table(*demo_rows(compare["results"]))),
        f"<h2>Targets</h2><ul>{checks_html}</ul>",
        '<h2>Training curves</h2><img src="curves.png" alt="training curves" '
        'style="max-width:100%">',
        f"<h2>Heatmaps (grounded model, held-out images)</h2><p>{esc(heat_intro)}</p>",
        f"{figures}<ul>{links}</ul>{iframe}",
        "</body></html>", ""])
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return {"md": os.path.join(out, "report.md"), "html": os.path.join(out, "report.html")}
