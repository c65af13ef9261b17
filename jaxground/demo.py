"""The demo: does training with the grounding loss reduce object hallucination?

  python -m jaxground.demo [--out runs/demo] [--steps 1200] [--quick]
  python -m jaxground.demo --world hard --out runs/demo_hard [--compare runs/demo]

`--world hard` gives shapes random colours (colour names no object) and up to 4 objects, and
trains with LLaVA-1.5's recipe instead of from scratch (`jaxground.config.recipe_config`):
the vision tower pretrained contrastively, the projector aligned alone (stage 1), then the
grounded and ungrounded fine-tunes (stage 2) from that one initialisation.

1. Builds the shapes world: a training split whose captions carry annotators'
   co-occurrence bias (an image with a circle but no square is still sometimes captioned
   "... and a blue square"; instance annotations stay true) and a held-out split, with
   another seed, whose reference captions are faithful.
2. Trains two tiny LLaVAs from the same initialisation and data order: grounding loss
   weight 1 ("grounded") and 0 ("ungrounded"); then fine-tunes the ungrounded one with
   LoRA and the grounding loss, its base frozen in int8 ("lora": LLaVA's one-GPU recipe).
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
# world -> (seed of the training world (held-out: + 1000), chance of a random colour,
# most objects per image). "hard": no colour tells a shape, up to 4 objects.
WORLDS = {"default": (DEMO_SEED, 0.0, 3), "hard": (11, 1.0, 4)}


def _world_config(bias: float, world: str = "default"):
    from jaxground.data.shapes import WorldConfig

    _, colour_noise, max_objects = WORLDS[world]
    # Partners appear together 70% of the time, so "a but not b" is common enough to count.
    co_occur = (("circle", "square", 0.7), ("triangle", "star", 0.7), ("ring", "bar", 0.7))
    return WorldConfig(co_occur=co_occur, caption_bias=bias, max_objects=max_objects,
                       colour_noise=colour_noise)


def build_worlds(out: str, train_images: int, heldout_images: int, bias: float,
                 world: str = "default") -> tuple:
    from jaxground.data.shapes import ensure_world

    seed = WORLDS[world][0]
    train_dir, heldout_dir = (os.path.join(out, "data", s) for s in ("train", "heldout"))
    ensure_world(train_dir, train_images, seed, _world_config(bias, world))
    ensure_world(heldout_dir, heldout_images, seed + 1000, _world_config(0.0, world))
    return train_dir, heldout_dir


def demo_config(args, train_dir: str, heldout_dir: str, grounding_weight: float,
                stage: str | None = None, init_from: str = ""):
    """The run of one model: from scratch (`stage` None, the default world) or a stage of
    the recipe (`jaxground.config.recipe_config`) starting from `init_from`."""
    from jaxground.config import recipe_config, shapes_config

    cfg = shapes_config() if stage is None else recipe_config(stage)
    cfg.data.dir, cfg.data.eval_dir = train_dir, heldout_dir
    cfg.model.init_from = init_from
    cfg.loss.grounding_weight = grounding_weight
    # Initialisation, pair sampling and data order (the worlds stay those of WORLDS).
    cfg.train.seed = cfg.data.seed = args.seed
    # The stages' own lengths are recipe_config's unless given (--vision-steps, --align-steps).
    given = {"vision": args.vision_steps, "align": args.align_steps}.get(stage, args.steps)
    cfg.train.steps = given or cfg.train.steps
    cfg.train.checkpoint_every = cfg.train.steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, cfg.train.steps)  # --quick stages
    # Held-out LM loss and AUROC along the way (the curves), for the compared models only.
    cfg.train.eval_every = max(args.steps // 4, 1) if stage in (None, "finetune") else 0
    cfg.eval.batch_size = 32
    cfg.eval.guidance = args.guidance
    cfg.eval.guidance_score = "log_sigmoid"  # only penalise: never reward naming objects
    cfg.eval.limit = args.eval_limit
    return cfg


# The LoRA column: LLaVA's way of fine-tuning on one GPU, at toy scale. The demo's
# ungrounded model is the base (as a user takes LLaVA-1.5), kept frozen in int8; adapters on
# the LLM's linears and the grounding heads learn with the grounding loss on.
LORA = {"rank": 8, "alpha": 16.0, "quant": "int8", "trainable": "lora,grounding_heads"}


def lora_config(args, train_dir: str, heldout_dir: str, stage: str | None, base: str):
    """The LoRA grounding fine-tune of the `base` workdir (`--lora-steps` steps)."""
    cfg = demo_config(args, train_dir, heldout_dir, 1.0, stage, init_from=base)
    cfg.model.lora.enabled = True
    cfg.model.lora.rank, cfg.model.lora.alpha = LORA["rank"], LORA["alpha"]
    cfg.model.quant = LORA["quant"]
    cfg.train.trainable = LORA["trainable"]
    cfg.train.steps = cfg.train.checkpoint_every = args.lora_steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, args.lora_steps)
    cfg.train.eval_every = max(args.lora_steps // 4, 1)
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


def pretrain_stages(args, train_dir: str, heldout_dir: str) -> tuple[dict, str, str | None]:
    """The hard world's shared stages before the fine-tunes (vision tower, then projector
    alignment). Returns ({stage: steps, seconds, last train metrics}, the checkpoint the
    fine-tunes start from, their recipe stage); the default world has none."""
    if args.world != "hard":
        return {}, "", None
    from jaxground.utils.jsonl import read_jsonl

    stages, init_from = {}, ""
    for stage, what in (("vision", "contrastive pretraining of the vision tower"),
                        ("align", "stage 1: the projector alone on captions")):
        cfg = demo_config(args, train_dir, heldout_dir, 0.0, stage, init_from)
        print(f"[demo] {what} ({cfg.train.steps} steps)", flush=True)
        workdir = os.path.join(args.out, stage)
        seconds = train_model(cfg, workdir)
        last = read_jsonl(os.path.join(workdir, "metrics.jsonl"))[-1]
        keep = ("loss", "retrieval_accuracy", "beats_hallucinated_twin", "lm_loss")
        stages[stage] = {"steps": cfg.train.steps, "seconds": seconds,
                         **{k: last[k] for k in keep if k in last}}
        init_from = workdir
    return stages, init_from, "finetune"


def compared_results(folder: str) -> dict | None:
    """Another demo's results and settings (`--compare`), or None."""
    if not folder:
        return None
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--compare {folder}: no results.json there (run that demo "
                                "first)")
    with open(path) as f:
        return {"folder": folder, "results": json.load(f)}


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
    p.add_argument("--world", default="default", choices=sorted(WORLDS),
                   help="hard: random colours, up to 4 objects, trained with LLaVA's recipe")
    p.add_argument("--vision-steps", type=int, default=0, help="hard world: contrastive "
                   "pretraining steps of the vision tower (0: the recipe's, 600)")
    p.add_argument("--align-steps", type=int, default=0,
                   help="hard world: stage 1 steps, the projector alone (0: the recipe's, 300)")
    p.add_argument("--compare", default="", help="another demo's folder whose results the "
                   "report shows beside these (e.g. the default world's runs/demo)")
    p.add_argument("--lora-steps", type=int, default=0, help="steps of the LoRA grounding "
                   "fine-tune of the ungrounded model (0: a quarter of --steps; -1: skip it)")
    p.add_argument("--quick", action="store_true", help="a tiny run (tests): 30 steps, "
                   "160 training / 24 held-out images (hard world: 20 + 10 stage steps; "
                   "LoRA: 10)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_images, args.heldout_images = 30, 160, 24
        args.vision_steps, args.align_steps = 20, 10
        args.lora_steps = args.lora_steps or 10
    args.lora_steps = args.lora_steps or max(args.steps // 4, 1)
    logging.basicConfig(level=logging.WARNING)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax's read-only restore notices
    from jaxground.eval import report

    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    print(f"[demo] building the shapes world in {args.out}/data", flush=True)
    train_dir, heldout_dir = build_worlds(args.out, args.train_images, args.heldout_images,
                                          args.caption_bias, args.world)
    results, configs = {}, {}
    stages, init_from, stage = pretrain_stages(args, train_dir, heldout_dir)
    for name, weight in (("grounded", 1.0), ("ungrounded", 0.0)):
        print(f"[demo] training the {name} model (grounding loss weight {weight}, "
              f"{args.steps} steps)", flush=True)
        cfg = configs[name] = demo_config(args, train_dir, heldout_dir, weight, stage,
                                          init_from)
        seconds = train_model(cfg, os.path.join(args.out, name))
        results[name] = {"train_seconds": seconds}
    runs = (("grounded", "grounded", False, ""), ("guided", "grounded", True, ""),
            ("ungrounded", "ungrounded", False, ""), ("vcd", "ungrounded", False, "vcd"))
    if args.lora_steps > 0:
        print(f"[demo] LoRA grounding fine-tune of the ungrounded model (rank {LORA['rank']}, "
              f"{LORA['quant']} base, {args.lora_steps} steps)", flush=True)
        cfg = configs["lora"] = lora_config(args, train_dir, heldout_dir, stage,
                                            os.path.join(args.out, "ungrounded"))
        results["lora"] = {"train_seconds": train_model(cfg, os.path.join(args.out, "lora"))}
        runs += (("lora", "lora", False, ""), ("lora_guided", "lora", True, ""))
    for name, model, guided, contrast in runs:
        print(f"[demo] evaluating {name} on {args.heldout_images} held-out images", flush=True)
        metrics = evaluate_model(configs[model], os.path.join(args.out, model), heldout_dir,
                                 guided, contrast)
        # Training time belongs to the model's own column; guided answers to yes/no
        # questions are the grounded model's (guidance acts on object words only).
        kept = {k: v for k, v in results[model].items()
                if (k == "train_seconds" and name == model) or (guided and k.startswith("pope_"))}
        results[name] = {**kept, **metrics}
    settings = {"world": args.world, "stages": stages,
                "compare": compared_results(args.compare),
                "steps": args.steps, "seed": args.seed, "train_images": args.train_images,
                "heldout_images": args.heldout_images, "caption_bias": args.caption_bias,
                "guidance": args.guidance,
                "lora": {**LORA, "steps": args.lora_steps} if args.lora_steps > 0 else None,
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
