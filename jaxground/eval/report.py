"""Human-readable reports of evaluation results (report.md) and grounding heatmap pages."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxground.eval import heatmap
from jaxground.eval.tasks import caption_prompt


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


def heatmap_pages(model, processor, samples: list[dict], coco_dir: str, cfg, out: str
                  ) -> tuple[list[str], list[dict]]:
    """For a few samples, an HTML page of the caption coloured by grounding, each object
    mention token clickable to show the image with that token's patch scores (teacher
    forced, mean over grounded layers). Returns the pages' paths relative to `out`, and
    examples: per mention of those captions {"image_id", "caption", "word", "hallucinated",
    "grounding", "png"} (the heatmap of the mention's first token, relative to `out`)."""
    from PIL import Image

    from jaxground.data.processor import open_image
    from jaxground.eval.tasks import grounding_truth, mention_samples
    from jaxground.inference.score import score

    usable = [s for s in samples if "error" not in s and s.get("token_ids")]
    vocab, truth = grounding_truth(coco_dir, usable, cfg.eval.split or None)
    sets = mention_samples(usable, processor.tokenizer, vocab, truth)
    config = model.config
    prompt = processor.encode(caption_prompt(cfg))["input_ids"]
    pages, examples = [], []
    for i in _pick(sets, cfg.eval.heatmaps):
        s, (text, spans, mentions) = usable[i], (sets[i]["text"], sets[i]["spans"],
                                                 sets[i]["mentions"])
        ids = np.asarray([prompt + s["token_ids"]], np.int32)
        pixels = processor.pixel_values([open_image(os.path.join(coco_dir, s["image"]))])
        scores = score(model, ids, pixels, patches=True)
        patches = np.asarray(scores.patches)[0, len(prompt):]  # [N, K]
        if config.vision_feature_select_strategy == "full":
            patches = patches[:, 1:]  # the class token is no patch
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
            title=f"image {s['image_id']}: hallucinated {sorted(hallucinated) or 'none'}")
        pages.append(os.path.relpath(page, out))
        for m in mentions:
            png = os.path.join(os.path.dirname(page), f"heatmap_{m['tokens'][0]:04d}.png")
            examples.append({"image_id": s["image_id"], "caption": text.strip(),
                             "word": m["word"], "hallucinated": m["hallucinated"],
                             "grounding": m["grounding"], "png": os.path.relpath(png, out)})
    return pages, examples


# ---- the demo's report ------------------------------------------------------------------
DEMO_ROWS = (("chair_s", "CHAIR_s (captions with a hallucination) ↓"),
             ("chair_i", "CHAIR_i (hallucinated mentions) ↓"),
             ("recall", "object recall ↑"),
             ("mean_length", "caption length (words)"),
             ("pope_random_f1", "POPE random F1 ↑"),
             ("pope_popular_f1", "POPE popular F1 ↑"),
             ("pope_adversarial_f1", "POPE adversarial F1 ↑"),
             ("token_auroc", "token AUROC of the grounding score ↑"),
             ("token_auroc_nll", "token AUROC of -NLL (baseline)"),
             ("train_seconds", "training seconds"))
DEMO_MODELS = ("ungrounded", "grounded", "guided")


def demo_table(results: dict) -> str:
    rows = [[label] + [results[m].get(key) for m in DEMO_MODELS] for key, label in DEMO_ROWS]
    for r in rows:
        if r[0] == "training seconds":
            r[1:] = [None if v is None else round(v, 1) for v in r[1:]]
    return _table(["", "ungrounded (λ = 0)", "grounded (λ = 1)", "grounded + guided decoding"],
                  rows)


def demo_checks(results: dict) -> list[tuple[str, bool, str]]:
    """The demo issue's targets: (what, met, the numbers)."""
    u, g, d = (results[m] for m in DEMO_MODELS)
    return [
        ("guided CHAIR_i ≤ half the ungrounded model's", d["chair_i"] <= 0.5 * u["chair_i"],
         f"{d['chair_i']:.4f} vs {u['chair_i']:.4f}"),
        ("guided object recall ≥ 0.9 × ungrounded", d["recall"] >= 0.9 * u["recall"],
         f"{d['recall']:.4f} vs {u['recall']:.4f}"),
        ("grounded POPE-adversarial F1 ≥ ungrounded + 5 points",
         g["pope_adversarial_f1"] >= u["pope_adversarial_f1"] + 0.05,
         f"{g['pope_adversarial_f1']:.4f} vs {u['pope_adversarial_f1']:.4f}"),
        ("grounded token AUROC ≥ 0.95", g["token_auroc"] >= 0.95, f"{g['token_auroc']:.4f}"),
    ]


def training_curves(out: str, runs: dict[str, str], path: str) -> str:
    """LM loss, grounding loss (train) and held-out grounding AUROC of each run, from its
    metrics.jsonl, side by side."""
    import json

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    panels = (("train", "lm_loss", "LM loss (train)"),
              ("train", "grounding_loss", "grounding loss (train)"),
              ("eval", "grounding_auroc", "grounding AUROC (held-out tokens)"))
    axes = fig.subplots(1, len(panels))
    for name, workdir in runs.items():
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for ax, (split, key, title) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker="o" if split == "eval" else None)
            ax.set_title(title)
            ax.set_xlabel("step")
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


def demo_report(out: str, results: dict, settings: dict) -> dict:
    """Writes OUT/results.json, OUT/curves.png, OUT/report.md and OUT/report.html."""
    import html
    import json

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({m: {k: v for k, v in results[m].items()
                       if k not in ("heatmaps", "heatmap_examples")}
                   for m in ("grounded", "guided", "ungrounded")}, f, indent=1)
    training_curves(out, {m: os.path.join(out, m) for m in ("grounded", "ungrounded")},
                    os.path.join(out, "curves.png"))
    checks = demo_checks(results)
    heatmaps = results["grounded"].get("heatmaps", []) + results["guided"].get("heatmaps", [])
    world = (f"{settings['train_images']} training images (captions: annotators' co-occurrence "
             f"bias {settings['caption_bias']}), {settings['heldout_images']} held-out images "
             "(faithful captions, another seed)")
    md = ["# jaxground demo: grounded vs ungrounded on the shapes world", "",
          f"Two tiny LLaVAs, same initialisation and data order, {settings['steps']} steps each; "
          f"{world}. Guided decoding: argmax log p + alpha * log sigmoid(grounding logit) over "
          f"the top-{settings['guidance_top_k']} candidates, alpha = {settings['guidance']}, "
          "on object words and the attribute words before them. Whole demo: {settings['seconds']:.0f} s.", "",
          demo_table(results), "", "## Targets", ""]
    md += [f"- [{'x' if ok else ' '}] {what}: {nums}" for what, ok, nums in checks]
    md += ["", "## Training curves", "", "![training curves](curves.png)", "",
           "## Heatmaps (grounded model, held-out images)", "",
           "Each page shows a generated caption with object words coloured by their grounding "
           "score; click a word to see which image patches support it."]
    shown = _contrasting(results["grounded"].get("heatmap_examples", []))
    for e in shown:
        kind = "hallucinated" if e["hallucinated"] else "correctly named"
        md += ["", f"**{kind}**: \"{e['word']}\" in \"{e['caption']}\" (image {e['image_id']}, "
               f"grounding logit {e['grounding']:.2f})", "", f"![{e['word']}]({e['png']})"]
    md += ["", "All pages:"] + [f"- [{p}]({p})" for p in heatmaps]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    head = ["ungrounded (λ = 0)", "grounded (λ = 1)", "grounded + guided"]
    rows = "".join(
        "<tr><th>" + html.escape(label) + "</th>" + "".join(
            f"<td>{html.escape(_f(results[m].get(key)))}</td>" for m in DEMO_MODELS) + "</tr>"
        for key, label in DEMO_ROWS)
    checks_html = "".join(f"<li>{'✅' if ok else '❌'} {html.escape(what)}: "
                          f"{html.escape(nums)}</li>" for what, ok, nums in checks)
    links = "".join(
        f'<figure style="display:inline-block;margin:0 1em"><img src="{html.escape(e["png"])}">'
        f'<figcaption>{"hallucinated" if e["hallucinated"] else "correctly named"}: '
        f'"{html.escape(e["word"])}" in "{html.escape(e["caption"])}" (logit '
        f'{e["grounding"]:.2f})</figcaption></figure>' for e in shown)
    links += "".join(f'<li><a href="{html.escape(p)}">{html.escape(p)}</a></li>'
                     for p in heatmaps)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>jaxground demo</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th:first-child{{text-align:left}}iframe{{width:100%;height:560px;border:1px solid #ccc}}</style>
</head><body><h1>jaxground demo: grounded vs ungrounded on the shapes world</h1>
<p>{html.escape(md[2])}</p><table><tr><th></th>{''.join(f'<th>{h}</th>' for h in head)}</tr>
{rows}</table><h2>Targets</h2><ul>{checks_html}</ul><h2>Training curves</h2>
<img src="curves.png" style="max-width:100%"><h2>Heatmaps</h2><ul>{links}</ul>
{f'<iframe src="{html.escape(heatmaps[0])}"></iframe>' if heatmaps else ''}</body></html>"""
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(page)
    return {"md": os.path.join(out, "report.md"), "html": os.path.join(out, "report.html")}
