"""Export a jaxground checkpoint to an HF LLaVA dir (safetensors + config.json; grounding
heads in grounding_heads.safetensors beside them).

  python convert/orbax_to_hf.py --ckpt ckpt/llava7b --out llava7b-hf      # converted dir
  python convert/orbax_to_hf.py --ckpt runs/grounded --out grounded-hf    # training workdir
  python convert/orbax_to_hf.py --ckpt runs/grounded --step 200 --out grounded-200-hf
The result loads with `LlavaForConditionalGeneration.from_pretrained(out)`.
"""

import argparse
import sys

from jaxground.checkpoints.hf_convert import jaxground_to_hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True,
                        help="converted checkpoint dir or training workdir")
    parser.add_argument("--step", type=int, default=None,
                        help="a workdir's checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output HF dir")
    parser.add_argument("--max_shard_gb", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        files = jaxground_to_hf(args.ckpt, args.out, int(args.max_shard_gb * (1 << 30)),
                                step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
