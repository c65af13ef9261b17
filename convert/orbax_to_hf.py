"""Export a jaxground checkpoint to an HF LLaVA dir (safetensors + config.json; grounding
heads in grounding_heads.safetensors beside them).

  python convert/orbax_to_hf.py --ckpt ckpt/llava7b --out llava7b-hf      # converted dir
  python convert/orbax_to_hf.py --ckpt runs/grounded --out grounded-hf    # training workdir
  python convert/orbax_to_hf.py --ckpt runs/grounded --step 200 --out grounded-200-hf
The result loads with `LlavaForConditionalGeneration.from_pretrained(out)`. A LoRA run
(quantized or not) is written as full weights: its adapters folded into its base's
weights, in the base's dtype.

  python convert/orbax_to_hf.py --ckpt runs/lora --adapter --out lora-peft [--base_hf B]
writes a LoRA run as a PEFT adapter instead (adapter_config.json +
adapter_model.safetensors; the projector and other parameters it trained as
modules_to_save): `PeftModel.from_pretrained(LlavaForConditionalGeneration
.from_pretrained(B), "lora-peft")`, where B is the run's base (`model.init_from`) exported
with this script; --base_hf records B (a dir or a Hub id) in adapter_config.json.
"""

import argparse
import sys

from jaxground.checkpoints.hf_convert import jaxground_to_hf, jaxground_to_peft


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="converted checkpoint dir or training workdir")
    parser.add_argument("--step", type=int, default=None,
                        help="a workdir's checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output HF dir")
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run: write a PEFT adapter dir, not merged full weights")
    parser.add_argument("--base_hf", default=None,
                        help="with --adapter: base_model_name_or_path to record (default: "
                             "the run's model.init_from)")
    args = parser.parse_args(argv)
    if args.base_hf and not args.adapter:
        parser.error("--base_hf goes with --adapter")
    try:
        if args.adapter:
            files = jaxground_to_peft(args.ckpt, args.out, step=args.step,
                                      base_name=args.base_hf)
        else:
            files = jaxground_to_hf(args.ckpt, args.out, int(args.max_shard_gb * (1 << 30)),
                                    step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
