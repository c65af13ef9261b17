"""The demo's report (jaxground.eval.report.demo_*) reads as written for people: no template
leftovers, sensible number formats, the columns present, plain-text target statuses; and the
shapes world's captions it quotes use "an" before a vowel."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from jaxground.eval import report

# Characters the reports may use: printable ASCII and a few symbols DejaVu Sans and
# Liberation Sans (the default fonts) both have. No emoji, no check marks.
SAFE = set(map(chr, range(32, 127))) | set("\nλ↑↓≤≥×—")
STATUSES = {"met", "missed", "n/a"}


def _metrics(chair_i, recall, auroc, pope=True, seconds=261.5, adversarial=0.79876):
    m = {"chair_s": chair_i * 2.5, "chair_i": chair_i, "recall": recall,
         "mean_length": 8.4321, "token_auroc": auroc, "token_auroc_nll": 0.61234,
         "hallucinated_mentions": 25, "mentions": 300}
    if pope:
        m.update(pope_random_f1=0.90123, pope_popular_f1=0.85, pope_adversarial_f1=adversarial)
    if seconds is not None:
        m["train_seconds"] = seconds
    return m


def _results(tmp_path, vcd: bool) -> dict:
    """What demo.main hands the report, with two heatmap examples (tiny PNGs) and the runs'
    metrics.jsonl (for the curves)."""
    for run in ("grounded", "ungrounded", "lora"):
        (tmp_path / run).mkdir()
        rows = [{"split": "train", "step": s, "lm_loss": 3.0 / s, "grounding_loss": 1.0 / s}
                for s in (1, 2, 3)] + [{"split": "eval", "step": 3, "grounding_auroc": 0.9}]
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                              for r in rows))
    (tmp_path / "heatmaps" / "7").mkdir(parents=True)
    for i in (3, 6):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(
            tmp_path / "heatmaps" / "7" / f"heatmap_{i:04d}.png")
    examples = [{"image_id": 7, "caption": "there is an orange ring and a pink bar .",
                 "word": word, "hallucinated": bad, "grounding": g,
                 "png": f"heatmaps/7/heatmap_{i:04d}.png"}
                for word, bad, g, i in (("ring", False, 2.5, 3), ("bar", True, -1.75, 6))]
    grounded = {**_metrics(0.08, 0.91, 0.97123), "heatmaps": ["heatmaps/7/index.html"],
                "heatmap_examples": examples}
    results = {"ungrounded": _metrics(0.11111, 0.9, 0.5, adversarial=0.7),
               "grounded": grounded,
               "guided": {**_metrics(0.04, 0.88, 0.96), "heatmaps": []}}
    if vcd:  # VCD: the ungrounded model, no training time or POPE of its own
        results["vcd"] = _metrics(0.09, 0.89, 0.5, pope=False, seconds=None)
    return results


SETTINGS = {"steps": 1200, "train_images": 2000, "heldout_images": 200, "caption_bias": 0.8,
            "guidance": 3.0, "guidance_top_k": 5, "seconds": 261.5}


class _Visible(HTMLParser):
    """The text a reader sees (outside <style> and <script>) and the attribute values."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.attrs, self.statuses, self._skip, self._status = [], [], [], 0, False

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script"):
            self._skip += 1
        self.attrs += [v for _, v in attrs if v]
        self._status = tag == "span" and "status" in dict(attrs).get("class", "")

    def handle_endtag(self, tag):
        if tag in ("style", "script"):
            self._skip -= 1
        self._status = False

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)
        if self._status:
            self.statuses.append(data)


@pytest.fixture(params=[False, True], ids=["without_vcd", "with_vcd"])
def rendered(request, tmp_path):
    results = _results(tmp_path, vcd=request.param)
    paths = report.demo_report(str(tmp_path), results, dict(SETTINGS))
    md = open(paths["md"], encoding="utf-8").read()
    page = _Visible()
    page.feed(open(paths["html"], encoding="utf-8").read())
    return request.param, tmp_path, md, page


def _table_lines(md):
    return [line for line in md.splitlines() if line.startswith("|")]


def test_no_template_leftovers(rendered):
    _, _, md, page = rendered
    for name, text in (("report.md", md), ("report.html text", " ".join(page.text)),
                       ("report.html attributes", " ".join(page.attrs))):
        assert "{" not in text and "}" not in text, (name, re.findall(r".{30}[{}].{30}", text))


def test_duration_and_number_formats(rendered):
    _, _, md, page = rendered
    html_text = " ".join(page.text)
    for text in (md, html_text):
        assert re.search(r"Whole demo: 262 s\b", text)       # 261.5 s, as a whole number
        assert "262 s" in text and "261.5" not in text
        assert not re.search(r"\d\.\d{4}", text)              # never four decimals
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in _table_lines(md)[2:]}
    assert rows["training time"][0] == "262 s"
    assert rows["CHAIR_i (hallucinated mentions) ↓"][0] == "0.111"           # 3 decimals
    assert rows["POPE adversarial F1 ↑"][0] == "0.700"
    assert rows["POPE adversarial F1 ↑"][-1] == "0.799"
    assert rows["caption length (words, mean)"][0] == "8.4"
    assert rows["object mentions: hallucinated / all"][0] == "25 / 300"      # integers
    for cells in rows.values():
        for c in cells:
            assert re.fullmatch(r"\d+\.\d{3}|\d+\.\d|\d+ / \d+|\d+ s|—", c), c
    # The targets' numbers too.
    assert "0.040 (guided) vs 0.111 (ungrounded)" in md and "0.971" in md


def test_columns_in_order_vcd_only_when_present(rendered):
    vcd, _, md, page = rendered
    header = [c.strip() for c in _table_lines(md)[0].split("|")[1:-1]]
    want = ["", "ungrounded (λ = 0)", "ungrounded + VCD", "grounded (λ = 1)",
            "grounded + guided"]
    assert header == (want if vcd else [h for h in want if "VCD" not in h])
    assert ("ungrounded + VCD" in " ".join(page.text)) == vcd
    assert ("VCD" in md) == vcd
    if vcd:  # VCD has no training time or POPE of its own: em dashes there, numbers elsewhere
        rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in _table_lines(md)[2:]}
        assert rows["training time"][1] == "—" and rows["POPE random F1 ↑"][1] == "—"
        assert rows["CHAIR_i (hallucinated mentions) ↓"][1] == "0.090"
    for line in _table_lines(md):
        assert line.count("|") == len(header) + 1, line      # every row has every column


def test_target_statuses_are_plain_words_in_safe_characters(rendered):
    _, _, md, page = rendered
    assert page.statuses == ["met", "met", "met", "met"]
    targets = [line for line in md.splitlines() if line.startswith("- **")]
    assert len(targets) == 4
    assert all(line.split("**")[1] in STATUSES for line in targets)
    for name, text in (("report.md", md), ("report.html", " ".join(page.text))):
        bad = sorted(set(text) - SAFE)
        assert not bad, (name, bad, [hex(ord(c)) for c in bad])


def test_targets_missing_data_and_misses(tmp_path):
    results = _results(tmp_path, vcd=False)
    results["guided"]["chair_i"] = 0.1                  # not half the ungrounded model's
    del results["grounded"]["pope_adversarial_f1"]
    checks = report.demo_checks(results)
    assert [ok for _, ok, _ in checks] == [False, True, None, True]
    paths = report.demo_report(str(tmp_path), results, dict(SETTINGS))
    page = _Visible()
    page.feed(open(paths["html"], encoding="utf-8").read())
    assert page.statuses == ["missed", "met", "n/a", "met"]


def test_hard_world_report_describes_the_recipe_and_shows_the_compared_demo(tmp_path):
    results = _results(tmp_path, vcd=False)
    other = {m: {**v, "chair_i": 0.777} for m, v in results.items()}
    stages = {"vision": {"steps": 600, "seconds": 86.6, "retrieval_accuracy": 0.72,
                         "beats_hallucinated_twin": 0.88},
              "align": {"steps": 300, "seconds": 51.8, "lm_loss": 2.14}}
    settings = dict(SETTINGS, world="hard", stages=stages,
                    compare={"folder": "runs/demo", "results": other})
    paths = report.demo_report(str(tmp_path), results, settings)
    md = open(paths["md"], encoding="utf-8").read()
    assert md.startswith("# jaxground demo: grounded vs ungrounded on the hard shapes world")
    assert "pretrained CLIP-style (600 steps, 87 s (1 min 27 s)" in md
    assert "## Beside it: the demo in runs/demo" in md and "0.777" in md
    assert "grounded token AUROC ≥ 0.9:" in md  # the hard world's own target
    page = _Visible()
    page.feed(open(paths["html"], encoding="utf-8").read())
    assert "0.777" in " ".join(page.text)


def test_shapes_captions_use_an_before_vowels(tmp_path):
    """'an orange ring', never 'a orange': in reference captions and in the absent partners a
    biased caption names; the labelled spans still cover the right words."""
    from jaxground.data import shapes
    from jaxground.data.coco import build_records, load_coco
    from jaxground.data.processor import load_tokenizer

    assert [w for w in (*shapes.SHAPES, *shapes.COLOURS) if w[0] in "aeiou"] == ["orange"]
    assert shapes.article("orange") == "an" and shapes.article("red") == "a"
    # Rings (orange) are the absent partner of bars here: biased captions name "an orange ring".
    cfg = shapes.WorldConfig(caption_bias=1.0, max_objects=3, co_occur=(("bar", "ring", 0.3),),
                             colour_noise=0.3)
    shapes.write_world(str(tmp_path), 80, seed=1, cfg=cfg)
    index = load_coco(str(tmp_path))
    captions = [c for caps in index.captions.values() for c in caps]
    text = " ".join(captions)
    assert "an orange" in text
    assert not re.search(r"\ba [aeiou]", text), re.findall(r"\ba [aeiou]\w*", text)
    assert not re.search(r"\ban [^aeiou]", text), re.findall(r"\ban [^aeiou]\w*", text)
    phantom = [i for i, objs in index.present.items() if "bar" in objs and "ring" not in objs]
    assert phantom and all("an orange ring" in c for i in phantom for c in index.captions[i])
    tok = load_tokenizer(str(tmp_path))
    assert tok.convert_tokens_to_ids("an") != tok.convert_tokens_to_ids("<unk>")
    records = build_records(str(tmp_path), ("random",), ("caption",), seed=0, attributes=True)
    for r in records:
        present = index.present[r["image_id"]]
        for start, end, label, category in r["spans"]:
            span = r["text"][start:end]
            assert span.split()[-1] == category
            # Positives label the whole noun phrase, its article included; edits keep the
            # replaced object's article and colour unlabelled.
            assert span.split()[0] in ("a", "an") if r["label"] == "positive" else True
            assert label == int(category in present), (r["text"], span)
    labelled = {(r["text"][s:e], lab) for r in records if r["label"] == "positive"
                and r["image_id"] in phantom for s, e, lab, _ in r["spans"]}
    assert ("an orange ring", 0) in labelled


def test_the_lora_column_and_its_targets(tmp_path):
    """The LoRA fine-tune's columns come last; its targets compare it with the ungrounded
    base: CHAIR_i <= 0.6x at recall >= 0.9x (plain and guided), POPE-adversarial +5 points."""
    results = _results(tmp_path, vcd=True)
    results["lora"] = _metrics(0.06, 0.8, 0.9, adversarial=0.76)   # recall 0.8 < 0.9 * 0.9
    results["lora_guided"] = _metrics(0.05, 0.9, 0.9, adversarial=0.76, seconds=None)
    settings = dict(SETTINGS, lora={"rank": 8, "alpha": 16.0, "quant": "int8",
                                    "trainable": "lora,grounding_heads", "steps": 300})
    paths = report.demo_report(str(tmp_path), results, settings)
    md = open(paths["md"], encoding="utf-8").read()
    header = [c.strip() for c in _table_lines(md)[0].split("|")[1:-1]]
    assert header[-2:] == ["ungrounded + LoRA grounding fine-tune", "LoRA fine-tune + guided"]
    assert "frozen in int8, with rank-8 adapters (alpha 16)" in md
    checks = {what: (ok, nums) for what, ok, nums in report.demo_checks(results)}
    plain = checks["LoRA fine-tune CHAIR_i ≤ 0.6 × ungrounded at recall ≥ 0.9 ×"]
    guided = checks["LoRA fine-tune + guided CHAIR_i ≤ 0.6 × ungrounded at recall ≥ 0.9 ×"]
    pope = checks["LoRA fine-tune POPE-adversarial F1 ≥ ungrounded + 5 points"]
    assert plain == (False, "CHAIR_i 0.060 vs 0.111, recall 0.800 vs 0.900")
    assert guided[0] is True and pope == (True, "0.760 (LoRA) vs 0.700 (ungrounded), +6.0 points")
    del results["lora"]["recall"]
    assert report.demo_checks(results)[4] == (
        "LoRA fine-tune CHAIR_i ≤ 0.6 × ungrounded at recall ≥ 0.9 ×", None, "not evaluated")
