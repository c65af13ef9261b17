"""Human-readable reports of evaluation results (report.md) and grounding heatmap pages."""

from __future__ import annotations

import math
import os

import numpy as np

from jaxground.eval import grounding_auroc, heatmap
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
    elif "seconds" in results:
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


def _pick(samples: list[dict], mention_sets: list[dict], n: int) -> list[int]:
    """Indices of up to n samples, those with both a real and a hallucinated mention first."""
    def rank(i):
        kinds = {m["hallucinated"] for m in mention_sets[i]["mentions"]}
        return (-len(kinds), -bool(kinds), i)

    return sorted(range(len(mention_sets)), key=rank)[:n]


HEATMAP_SIZE = 336  # pixels; small images (the shapes world's) are scaled up to be readable


def heatmap_pages(model, processor, samples: list[dict], coco_dir: str, cfg, out: str
                  ) -> list[str]:
    """For a few samples, an HTML page of the caption coloured by grounding, each object
    mention token clickable to show the image with that token's patch scores (teacher
    forced, mean over grounded layers). Returns the pages' paths relative to `out`."""
    from PIL import Image

    from jaxground.data.coco import load_coco
    from jaxground.data.objects import vocabulary_for
    from jaxground.data.processor import open_image
    from jaxground.eval import chair
    from jaxground.inference.score import score

    index = load_coco(coco_dir, cfg.eval.split or None)
    vocab = vocabulary_for(index.categories)
    usable = [s for s in samples if "error" not in s and s.get("token_ids")]
    sets = [_mentions(processor.tokenizer, s, vocab,
                      chair.ground_truth(index, vocab, s["image_id"])[1]) for s in usable]
    config = model.config
    pages = []
    for i in _pick(usable, sets, cfg.eval.heatmaps):
        s, (text, spans, mentions) = usable[i], sets[i]["parts"]
        prompt = processor.encode(caption_prompt(cfg))["input_ids"]
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
    return pages


def _mentions(tokenizer, sample, vocab, truth) -> dict:
    text, spans = grounding_auroc.token_spans(tokenizer, sample["token_ids"])
    mentions = grounding_auroc.mention_records(text, spans, vocab, truth,
                                               {"grounding": sample["grounding"]})
    return {"mentions": mentions, "parts": (text, spans, mentions)}
