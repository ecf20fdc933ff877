"""Measurements on a ``vllm.LLM``: KV capacity, perplexity, greedy agreement.

Shared by the tests and ``scripts/bench_vllm.py`` so that the figures in the
docs and the assertions in CI come from the same code. A tool, not a serving
path: nothing in the plugin imports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def kv_capacity_tokens(llm: Any) -> int:
    """KV-cache tokens the engine reports (blocks x block size)."""
    cache = llm.llm_engine.vllm_config.cache_config
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def token_windows(llm: Any, text: str, num_tokens: int, window: int) -> list[list[int]]:
    """``num_tokens`` tokens of ``text`` in windows of ``window``, each opened as a prompt is.

    A tokenizer that starts every prompt with BOS (Gemma) gets it at the head of each window
    (without it Gemma-3-270m's NLL is 3.21 instead of 2.72); SmolLM2's adds nothing.
    """
    tokenizer = llm.get_tokenizer()
    prefix = tokenizer.encode("", add_special_tokens=True)
    step = window - len(prefix)
    count = num_tokens // window
    ids = tokenizer.encode(text, add_special_tokens=False)[: count * step]
    if len(ids) < count * step or count == 0:
        raise ValueError(f"text has only {len(ids)} tokens, {num_tokens} in windows of {window} requested")
    return [prefix + ids[i * step : (i + 1) * step] for i in range(count)]


def perplexity(llm: Any, windows: list[list[int]]) -> float:
    """Perplexity of each window's tokens given the ones before them, via ``prompt_logprobs``.

    Every token after the first of a window is scored while attention reads
    the window's K/V from the engine's cache (written in the same step).
    """
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    total, count = 0.0, 0
    for window, output in zip(windows, outputs, strict=True):
        for token, logprobs in zip(window[1:], output.prompt_logprobs[1:], strict=True):
            total += logprobs[token].logprob
            count += 1
    return math.exp(-total / count)


@dataclass
class GreedyAgreement:
    prefix_fraction: float  # mean share of the first N tokens before the first disagreement
    exact: int  # continuations identical over all N tokens
    total: int


def greedy_tokens(llm: Any, prompts: list[str], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> GreedyAgreement:
    fractions, exact = [], 0
    for ref, cand in zip(reference, candidate, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, cand, strict=False)) if a != b), len(ref))
        fractions.append(same / len(ref))
        exact += same == len(ref)
    return GreedyAgreement(sum(fractions) / len(fractions), exact, len(reference))


# Prompts for greedy agreement: varied registers, none from the eval texts.
GREEDY_PROMPTS = [
    "The capital of France is",
    "Here is a short recipe for pancakes:",
    "def fibonacci(n):",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea,",
    "Water boils at a temperature of",
    "The most important thing about writing clear code is",
    "In 1969, the first humans to walk on the Moon were",
]
