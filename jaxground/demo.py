"""The demo: does training with the grounding loss reduce object hallucination?

  python -m jaxground.demo [--out runs/demo] [--steps 1200] [--quick]

1. Builds the shapes world: a training split whose captions carry annotators'
   co-occurrence bias (an image with a circle but no square is still sometimes captioned
   "... and a blue square"; instance annotations stay true) and a held-out split, with
   another seed, whose reference captions are faithful.
2. Trains two tiny LLaVAs from the same initialisation and data order: grounding loss
   weight 1 ("grounded") and 0 ("ungrounded").
3. Evaluates both on held-out images: POPE (random / popular / adversarial), CHAIR on
   generated captions and the token AUROC of the grounding score; the grounded model also
   with grounding-guided decoding ("guided"), the ungrounded one also with visual
   contrastive decoding ("vcd", Leng et al. 2024), the decoding-time baseline.
4. Writes OUT/report.md, OUT/report.html, OUT/results.json, training curves and heatmaps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

DEMO_SEED = 0


def _world_config(bias: float):
    from jaxground.data.shapes import WorldConfig

    # Partners appear together 70% of the time, so "a but not b" is common enough to count.
    co_occur = (("circle", "square", 0.7), ("triangle", "star", 0.7), ("ring", "bar", 0.7))
    return WorldConfig(co_occur=co_occur, caption_bias=bias, max_objects=3)


def build_worlds(out: str, train_images: int, heldout_images: int, bias: float) -> tuple:
    from jaxground.data.shapes import ensure_world

    train_dir, heldout_dir = (os.path.join(out, "data", s) for s in ("train", "heldout"))
    ensure_world(train_dir, train_images, DEMO_SEED, _world_config(bias))
    ensure_world(heldout_dir, heldout_images, DEMO_SEED + 1000, _world_config(0.0))
    return train_dir, heldout_dir


def demo_config(args, train_dir: str, heldout_dir: str, grounding_weight: float):
    from jaxground.config import shapes_config

    cfg = shapes_config()
    cfg.data.dir, cfg.data.eval_dir = train_dir, heldout_dir
    cfg.loss.grounding_weight = grounding_weight
    # Initialisation, pair sampling and data order (the worlds stay those of DEMO_SEED).
    cfg.train.seed = cfg.data.seed = args.seed
    cfg.train.steps = args.steps
    cfg.train.checkpoint_every = args.steps
    cfg.train.eval_every = max(args.steps // 4, 1)
    cfg.eval.batch_size = 32
    cfg.eval.guidance = args.guidance
    cfg.eval.guidance_score = "log_sigmoid"  # only penalise: never reward naming objects
    cfg.eval.limit = args.eval_limit
    return cfg


def train_model(cfg, workdir: str) -> float:
    """Trains (or, when a finished run is there, reuses) a model; returns its seconds."""
    from jaxground.config import RunConfig
    from jaxground.training.trainer import train

    stamp = os.path.join(workdir, "train_seconds.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return json.load(f)["train_seconds"]
    t0 = time.perf_counter()
    train(RunConfig.from_config_dict(cfg).train, workdir)
    seconds = time.perf_counter() - t0
    with open(stamp, "w") as f:
        json.dump({"train_seconds": seconds}, f)
    return seconds


def evaluate_model(cfg, workdir: str, heldout: str, guided: bool, contrast: str = "") -> dict:
    """POPE + CHAIR + token AUROC on the held-out split (captions generated once, for both
    CHAIR and the AUROC)."""
    from jaxground.eval import runner, tasks
    from jaxground.utils.jsonl import read_jsonl

    cfg.eval.guided, cfg.eval.contrast = guided, contrast
    settings = runner.settings_for(workdir, cfg)
    out = {}
    if not guided:  # guidance acts on object words only: yes/no answers are the same
        pope = runner.run_task(workdir, "pope", heldout, settings)["metrics"]
        out.update({f"pope_{s}_f1": pope[s]["f1"] for s in ("random", "popular", "adversarial")})
        out.update({f"pope_{s}_accuracy": pope[s]["accuracy"]
                    for s in ("random", "popular", "adversarial")})
    eval_dir = runner.output_dir(workdir, "grounding", heldout, settings)
    g = runner.run_task(workdir, "grounding", heldout, settings, out=eval_dir)
    chair = tasks.score_chair(read_jsonl(os.path.join(eval_dir, runner.SAMPLES_FILE)), heldout,
                              matcher=settings.chair_matcher)
    # Report paths are relative to the demo folder, the workdirs' parent.
    prefix = os.path.relpath(eval_dir, os.path.dirname(os.path.normpath(workdir)))
    out.update(chair_s=chair["chair_s"], chair_i=chair["chair_i"], recall=chair["recall"],
               mean_length=chair["mean_length"],
               token_auroc=g["metrics"]["token"]["grounding"]["auroc"],
               token_auroc_nll=g["metrics"]["token"]["nll"]["auroc"],
               hallucinated_mentions=g["metrics"]["hallucinated_mentions"],
               mentions=g["metrics"]["mentions"],
               heatmaps=[os.path.join(prefix, p) for p in g.get("heatmaps", [])],
               heatmap_examples=[{**e, "png": os.path.join(prefix, e["png"])}
                                 for e in g.get("heatmap_examples", [])])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--heldout-images", type=int, default=200)
    p.add_argument("--caption-bias", type=float, default=0.8)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--eval-limit", type=int, default=0, help="first N held-out items only")
    p.add_argument("--seed", type=int, default=0, help="initialisation, pair sampling and "
                   "data order of both models (the same for both; the worlds do not change)")
    p.add_argument("--quick", action="store_true", help="a tiny run (tests): 30 steps, "
                   "160 training / 24 held-out images")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_images, args.heldout_images = 30, 160, 24
    logging.basicConfig(level=logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only restore notices
    from jaxground.eval import report

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    print(f"[demo] building the shapes world in {args.out}/data", flush=True)
    train_dir, heldout_dir = build_worlds(args.out, args.train_images, args.heldout_images,
                                          args.caption_bias)
    results, configs = {}, {}
    for name, weight in (("grounded", 1.0), ("ungrounded", 0.0)):
        print(f"[demo] training the {name} model (grounding loss weight {weight}, "
              f"{args.steps} steps)", flush=True)
        cfg = configs[name] = demo_config(args, train_dir, heldout_dir, weight)
        seconds = train_model(cfg, os.path.join(args.out, name))
        results[name] = {"train_seconds": seconds}
    runs = (("grounded", "grounded", False, ""), ("guided", "grounded", True, ""),
            ("ungrounded", "ungrounded", False, ""), ("vcd", "ungrounded", False, "vcd"))
    for name, model, guided, contrast in runs:
        print(f"[demo] evaluating {name} on {args.heldout_images} held-out images", flush=True)
        metrics = evaluate_model(configs[model], os.path.join(args.out, model), heldout_dir,
                                 guided, contrast)
        # Training time belongs to the model's own column; guided answers to yes/no
        # questions are the grounded model's (guidance acts on object words only).
        kept = {k: v for k, v in results[model].items()
                if (k == "train_seconds" and name == model) or (guided and k.startswith("pope_"))}
        results[name] = {**kept, **metrics}
    settings = {"steps": args.steps, "seed": args.seed, "train_images": args.train_images,
                "heldout_images": args.heldout_images, "caption_bias": args.caption_bias,
                "guidance": args.guidance,
                "guidance_top_k": configs["grounded"].eval.guidance_top_k,
                "vcd": {"alpha": configs["ungrounded"].eval.contrast_alpha,
                        "beta": configs["ungrounded"].eval.contrast_beta,
                        "noise_step": configs["ungrounded"].eval.contrast_noise_step},
                "seconds": time.perf_counter() - t_start}
    paths = report.demo_report(args.out, results, settings)
    print()
    print(report.demo_table(results))
    print(f"\n[demo] report: {paths['md']} and {paths['html']} ({settings['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
