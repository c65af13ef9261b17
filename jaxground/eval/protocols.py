"""Evaluation protocols: the published ways of asking a model POPE, MME and CHAIR questions.

A number is comparable with a paper's only when the prompt, the image preprocessing, the
decoding and the answer parser are the paper's. Each protocol names all of them:

| protocol    | prompt format                          | image          | short answers     | parsers (POPE / MME)  |
|-------------|----------------------------------------|----------------|-------------------|-----------------------|
| `llava_1_5` | conv_vicuna_v1 (system prompt)         | pad, LLaVA fill | greedy, 128 tokens | LLaVA / official      |
| `hf`        | llava-hf chat "USER: <image>\\n..."     | centre crop    | greedy, 128 tokens | LLaVA / official      |
| `lmms_eval` | conv_vicuna_v1 (lmms-eval's llava)     | pad, LLaVA fill | greedy, 128 / 16  | lmms-eval / lmms-eval |
| `training`  | the run's own `data.template`, `data.pad_to_square`, caption prompt | | greedy, 128 | LLaVA / official |

Short-answer questions get LLaVA-1.5's suffix "\\nAnswer the question using a single word or
phrase." (all four); CHAIR captions are asked "Please describe this image in detail." with up
to 512 new tokens (64 is the common short option: `eval.max_new_tokens=64`), except under
`training`, which asks the run's own caption prompt. `eval.*` fields override single parts
(`eval.template`, `eval.image_aspect_ratio`, `eval.answer_tokens`, `eval.max_new_tokens`,
`eval.caption_prompt`, `eval.pope_parser`, `eval.mme_parser`); an empty / 0 field keeps the
protocol's value.

Sources: LLaVA's `scripts/v1_5/eval/{pope,mme}.sh` + `llava/eval/model_vqa_loader.py`
(conv_mode vicuna_v1, temperature 0, max_new_tokens 128), `llava/mm_utils.py`
(`expand2square` with `int(x * 255)` of the CLIP mean); lmms-eval's `tasks/pope/pope.yaml`
(128 tokens) and `tasks/mme/mme.yaml` (16 tokens).
"""

from __future__ import annotations

import dataclasses

from jaxground.data.processor import TEMPLATES
from jaxground.data.prompts import SHORT_ANSWER_SUFFIX

CHAIR_PROMPT = "Please describe this image in detail."
POPE_PARSERS = ("llava", "lmms_eval")
MME_PARSERS = ("official", "lmms_eval")
IMAGE_ASPECT_RATIOS = ("pad", "crop")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that decides what a model is asked and how its answer is read."""

    name: str
    template: str               # prompt format (jaxground.data.processor.TEMPLATES)
    image_aspect_ratio: str     # "pad": LLaVA's expand2square first; "crop": CLIP's crop
    answer_tokens: int          # max new tokens of a short (POPE / MME) answer
    mme_answer_tokens: int
    caption_prompt: str         # "" = the run's training caption prompt
    caption_tokens: int         # max new tokens of a CHAIR / grounding caption
    pope_parser: str
    mme_parser: str
    short_answer_suffix: str = SHORT_ANSWER_SUFFIX

    @property
    def pad_to_square(self) -> bool:
        return self.image_aspect_ratio == "pad"

    def describe(self) -> str:
        """One line for logs and reports."""
        image = ("pad to square (LLaVA's fill)" if self.pad_to_square else "centre crop")
        return (f"{self.name}: template {self.template}, {image}, greedy up to "
                f"{self.answer_tokens} answer tokens (MME {self.mme_answer_tokens}), captions "
                f"{self.caption_prompt or '(training prompt)'!r} up to {self.caption_tokens} "
                f"tokens, POPE parser {self.pope_parser}, MME parser {self.mme_parser}")


PROTOCOLS = {
    "llava_1_5": Protocol("llava_1_5", template="vicuna_v1", image_aspect_ratio="pad",
                          answer_tokens=128, mme_answer_tokens=128, caption_prompt=CHAIR_PROMPT,
                          caption_tokens=512, pope_parser="llava", mme_parser="official"),
    "hf": Protocol("hf", template="hf", image_aspect_ratio="crop", answer_tokens=128,
                   mme_answer_tokens=128, caption_prompt=CHAIR_PROMPT, caption_tokens=512,
                   pope_parser="llava", mme_parser="official"),
    "lmms_eval": Protocol("lmms_eval", template="vicuna_v1", image_aspect_ratio="pad",
                          answer_tokens=128, mme_answer_tokens=16, caption_prompt=CHAIR_PROMPT,
                          caption_tokens=512, pope_parser="lmms_eval", mme_parser="lmms_eval"),
    # Filled from the run's data config by `resolve`.
    "training": Protocol("training", template="", image_aspect_ratio="", answer_tokens=128,
                         mme_answer_tokens=128, caption_prompt="", caption_tokens=64,
                         pope_parser="llava", mme_parser="official"),
}


class EvalConfigError(ValueError):
    """An impossible `config.eval` value: an unknown protocol or parser, an impossible
    override, a negative batch size; the message names the field (`config.eval.<field>`)."""


# The name the CLIs (jaxground.cli.USER_ERRORS: printed in one line) and callers know it by.
ProtocolError = EvalConfigError


def resolve(s) -> Protocol:
    """The protocol evaluation settings (a jaxground.eval.settings.EvalSettings) ask for,
    `s.protocol`, with their overrides applied and, for `training`, the run's own data
    format (`s.data_template`, `s.data_pad_to_square`) filled in."""
    if s.protocol not in PROTOCOLS:
        raise EvalConfigError(f"config.eval.protocol: {s.protocol!r} is not one of "
                              f"{sorted(PROTOCOLS)}")
    p = PROTOCOLS[s.protocol]
    if s.protocol == "training":
        from jaxground.data.pipeline import PipelineConfig

        p = dataclasses.replace(p, template=s.data_template,
                                image_aspect_ratio="pad" if s.data_pad_to_square else "crop",
                                caption_prompt=PipelineConfig.caption_prompt)
    overrides = {
        "template": s.template, "image_aspect_ratio": s.image_aspect_ratio,
        "answer_tokens": s.answer_tokens, "mme_answer_tokens": s.answer_tokens,
        "caption_prompt": s.caption_prompt, "caption_tokens": s.max_new_tokens,
        "pope_parser": s.pope_parser, "mme_parser": s.mme_parser}
    p = dataclasses.replace(p, **{k: v for k, v in overrides.items() if v})
    _check(p.template in TEMPLATES, "template", p.template, sorted(TEMPLATES))
    _check(p.image_aspect_ratio in IMAGE_ASPECT_RATIOS, "image_aspect_ratio",
           p.image_aspect_ratio, IMAGE_ASPECT_RATIOS)
    _check(p.pope_parser in POPE_PARSERS, "pope_parser", p.pope_parser, POPE_PARSERS)
    _check(p.mme_parser in MME_PARSERS, "mme_parser", p.mme_parser, MME_PARSERS)
    return p


def _check(ok: bool, field: str, value, allowed) -> None:
    if not ok:
        raise EvalConfigError(f"config.eval.{field}: {value!r} is not one of {list(allowed)}")
