"""Convert an HF LLaVA-1.5 checkpoint dir into a jaxground (Orbax) checkpoint dir.

  python convert/hf_to_orbax.py --hf_dir llava-1.5-7b-hf --out ckpt/llava7b [--dtype bfloat16]
"""

import argparse
import os
import resource
import sys
import time

from jaxground.checkpoints.hf_convert import hf_to_jaxground
from jaxground.models.config import GROUNDING_TYPES, GroundingConfig


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, help="HF dir with config.json + weights")
    parser.add_argument("--out", required=True, help="output jaxground checkpoint dir")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="parameter and compute dtype (default float32)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pytorch_model*.bin (unpickling can execute code)")
    parser.add_argument("--grounding_type", choices=GROUNDING_TYPES, default=None,
                        help="grounding head type (default: similarity)")
    parser.add_argument("--grounding_layers", default=None,
                        help="comma-separated decoder layers with a head (default: the last "
                             "four); 'none' for no heads")
    args = parser.parse_args(argv)
    start_rss, t0 = _rss_bytes(), time.time()
    try:
        grounding = None
        if args.grounding_type or args.grounding_layers:
            layers = GroundingConfig.parse_layers(args.grounding_layers or "",
                                                  "--grounding_layers")
            grounding = GroundingConfig(layers=layers, type=args.grounding_type or "similarity")
        config = hf_to_jaxground(args.hf_dir, args.out, args.dtype, args.allow_pickle,
                                 grounding)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(os.path.getsize(os.path.join(args.hf_dir, n)) for n in os.listdir(args.hf_dir)
                  if n.endswith((".safetensors", ".bin")))
    print(f"converted {args.hf_dir} -> {args.out} ({config.text.num_layers} decoder layers, "
          f"{config.param_dtype}, {config.grounding.type} grounding heads on layers "
          f"{list(config.grounded_layers)}) in {time.time() - t0:.1f}s")
    print(f"memory: checkpoint_bytes={weights} peak_rss_bytes={peak} "
          f"start_rss_bytes={start_rss} peak_over_checkpoint={peak / max(weights, 1):.3f} "
          f"added_over_checkpoint={(peak - start_rss) / max(weights, 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
