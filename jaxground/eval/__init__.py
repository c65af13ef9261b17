"""Hallucination benchmarks: POPE (yes/no object probing) and CHAIR (object hallucination in
free captions). Pure Python scoring; generating the answers/captions is the model's job."""
