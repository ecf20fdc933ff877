"""Scoring for the nf4kv_cont_* generation tasks (next-3-words exact match)."""

import re

_WORD = re.compile(r"[^\w']+")


def _words(text: str, n: int) -> list[str]:
    return [w for w in _WORD.split(text.lower()) if w][:n]


def process_results(doc: dict, results: list[str]) -> dict:
    target = _words(doc["target"], 3)
    generated = _words(results[0], len(target))
    return {
        "exact_match": float(generated == target),
        "first_word": float(generated[:1] == target[:1]),
    }
