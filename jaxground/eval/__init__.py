"""Hallucination metrics: POPE, CHAIR and MME scoring of answers and captions."""
