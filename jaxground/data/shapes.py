"""The shapes world: a seeded synthetic COCO-format corpus small enough to train on a CPU.

Each image (default 64x64) holds 1-4 coloured shapes. Objects are shapes; colours are
attributes. Some shapes usually appear together (`CO_OCCUR`), so a model that learns the
captions' statistics instead of looking will name the partner when it is absent: the
hallucination the grounding heads are meant to catch.

  python -m jaxground.data.shapes --out DIR --num-images N --seed S

writes DIR/images/*.png, DIR/annotations/instances.json (COCO: images, annotations with
boxes, categories), DIR/annotations/captions.json (COCO captions) and DIR/tokenizer.json
(a WordLevel tokenizer trained on the world's text with `tokenizers`). Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "bar")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220),
           "yellow": (230, 200, 40), "purple": (150, 60, 180), "orange": (240, 140, 30),
           "cyan": (40, 200, 210), "pink": (240, 120, 190)}
# Each shape's usual colour. A tiny from-scratch vision tower learns colour in minutes and
# shape much later, so by default a shape keeps its colour (`colour_noise` = chance of
# another one): what is in the image is learnable on a CPU, which the demo's comparison
# (grounded vs ungrounded) needs.
SHAPE_COLOURS = dict(zip(("circle", "square", "triangle", "diamond", "cross", "ring", "star",
                          "bar"), ("red", "blue", "green", "yellow", "purple", "orange",
                                   "cyan", "pink")))
# (a, b, p): when `a` is drawn, `b` joins it with probability p.
CO_OCCUR = (("circle", "square", 0.9), ("triangle", "star", 0.9), ("ring", "bar", 0.85))
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# Words of the prompts and answers the data pipeline and evaluation build around captions.
PROMPT_WORDS = ("user assistant describe the image . is there a an in ? yes no answer "
                "question using single word or phrase : , and with of on").split()


@dataclass(frozen=True)
class WorldConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    min_size: int = 14
    max_size: int = 24
    co_occur: tuple = CO_OCCUR
    colour_noise: float = 0.0
    # Chance that a caption of an image holding `a` but not its usual partner `b` names `b`
    # anyway (annotators' co-occurrence bias; instance annotations stay true). Captions
    # trained on with a bias teach a model to hallucinate the partner.
    caption_bias: float = 0.0


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, w // 5))
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "cross":
        t = w // 3
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=colour)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=colour)
    elif shape == "star":
        pts = []
        for i in range(10):
            r = (w / 2) if i % 2 == 0 else (w / 5)
            a = math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy - r * math.sin(a)))
        draw.polygon(pts, fill=colour)
    elif shape == "bar":
        draw.rectangle((x0, cy - h / 6, x1, cy + h / 6), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _overlaps(a, b, pad=2) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1]
                or b[3] + pad <= a[1])


def sample_scene(rng: random.Random, cfg: WorldConfig) -> list[tuple[str, str, tuple]]:
    """[(shape, colour, (x0, y0, x1, y1))], non-overlapping, with co-occurrence bias."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    shapes: list[str] = []
    while len(shapes) < n:
        s = rng.choice([x for x in SHAPES if x not in shapes])
        shapes.append(s)
        for a, b, p in cfg.co_occur:
            if s == a and b not in shapes and rng.random() < p and len(shapes) < cfg.max_objects:
                shapes.append(b)
    objects, boxes = [], []
    for s in shapes:
        for _ in range(50):  # rejection sampling for a free spot
            size = rng.randint(cfg.min_size, cfg.max_size)
            x0 = rng.randint(0, cfg.image_size - size)
            y0 = rng.randint(0, cfg.image_size - size)
            box = (x0, y0, x0 + size, y0 + size)
            if not any(_overlaps(box, b) for b in boxes):
                boxes.append(box)
                colour = (rng.choice(sorted(COLOURS)) if rng.random() < cfg.colour_noise
                          else SHAPE_COLOURS[s])
                objects.append((s, colour, box))
                break
    return objects


def phantoms(objects, cfg: WorldConfig, rng: random.Random) -> list[tuple[str, str, None]]:
    """Absent partners a biased caption names: [(shape, its usual colour, None)]."""
    if not cfg.caption_bias:
        return []  # no draws: worlds without bias stay byte-identical
    here = {shape for shape, _, _ in objects}
    return [(b, SHAPE_COLOURS[b], None) for a, b, _ in cfg.co_occur
            if a in here and b not in here and rng.random() < cfg.caption_bias]


def article(word: str) -> str:
    """"an" before a vowel sound ("an orange ring"), else "a". Every colour and shape word of
    this world is spelled as it sounds, so the first letter decides."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption(objects, rng: random.Random) -> str:
    """'a red circle and an orange ring .' (objects in a random order; the partners a biased
    caption names come through here too, so they get the right article as well)."""
    parts = [f"{article(colour)} {colour} {shape}"
             for shape, colour, _ in rng.sample(objects, len(objects))]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{rng.choice(['there is', 'the image shows', 'i see'])} {body} ."


def render(objects, cfg: WorldConfig, rng: random.Random) -> Image.Image:
    shade = rng.randint(200, 245)
    img = Image.new("RGB", (cfg.image_size, cfg.image_size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    for shape, colour, box in objects:
        _draw(draw, shape, box, COLOURS[colour])
    return img


def write_world(out_dir: str, num_images: int, seed: int, cfg: WorldConfig = WorldConfig(),
                captions_per_image: int = 2) -> dict:
    """Generates the world into `out_dir`; returns a small summary."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in
                  enumerate(SHAPES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, instances, captions = [], [], []
    for image_id in range(1, num_images + 1):
        objects = sample_scene(rng, cfg)
        name = f"shapes_{seed}_{image_id:06d}.png"
        render(objects, cfg, rng).save(os.path.join(out_dir, "images", name), optimize=False)
        images.append({"id": image_id, "file_name": name, "width": cfg.image_size,
                       "height": cfg.image_size})
        for shape, colour, (x0, y0, x1, y1) in objects:
            instances.append({"id": len(instances) + 1, "image_id": image_id,
                              "category_id": cat_id[shape], "bbox": [x0, y0, x1 - x0, y1 - y0],
                              "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                              "attributes": {"colour": colour}})
        for _ in range(captions_per_image):
            named = objects + phantoms(objects, cfg, rng)
            captions.append({"id": len(captions) + 1, "image_id": image_id,
                             "caption": caption(named, rng)})
    info = {"description": f"jaxground shapes world, seed {seed}", "version": "1"}
    _dump(os.path.join(out_dir, "annotations", "instances.json"),
          {"info": info, "images": images, "annotations": instances, "categories": categories})
    _dump(os.path.join(out_dir, "annotations", "captions.json"),
          {"info": info, "images": images, "annotations": captions})
    train_tokenizer([c["caption"] for c in captions]).save(
        os.path.join(out_dir, "tokenizer.json"))
    return {"images": len(images), "objects": len(instances), "captions": len(captions)}


def ensure_world(out_dir: str, num_images: int, seed: int,
                 cfg: WorldConfig = WorldConfig()) -> bool:
    """Writes the world unless a finished one is there (a `.complete` stamp, written last, so
    an interrupted generation is redone). Returns whether it wrote."""
    done = os.path.join(out_dir, ".complete")
    if os.path.exists(done):
        return False
    write_world(out_dir, num_images, seed, cfg)
    open(done, "w").close()
    return True


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def train_tokenizer(texts: list[str]):
    """A WordLevel tokenizer over the world's whole vocabulary (so it never depends on which
    words the sampled captions happened to use)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # "Yes" and "yes" are one word here
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("<image>", "isolated"), pre_tokenizers.Whitespace()])
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    vocabulary = list(SHAPES) + sorted(COLOURS) + PROMPT_WORDS + ["see", "shows", "there"]
    tok.train_from_iterator(sorted(texts) + vocabulary, trainer=trainer)
    return tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic shapes world.")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--caption-bias", type=float, default=0.0,
                   help="chance a caption names an absent co-occurring partner")
    p.add_argument("--colour-noise", type=float, default=0.0,
                   help="chance a shape gets a random colour instead of its own")
    args = p.parse_args(argv)
    summary = write_world(args.out, args.num_images, args.seed,
                          WorldConfig(image_size=args.image_size, caption_bias=args.caption_bias,
                                      colour_noise=args.colour_noise))
    print(f"wrote {args.out}: {summary}")


if __name__ == "__main__":
    main()
