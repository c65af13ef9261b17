"""Prompt text shared by training data (pipeline.py) and evaluation (jaxground.eval)."""

# LLaVA-1.5's instruction after a short-answer (POPE / MME / VQA) question: a newline, then
# the instruction (llava/eval/model_vqa_loader.py's questions carry it).
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
