"""Run a Hugging Face causal LM with a hook on the K/V a paged cache would store.

The hook sees every layer's query, key and value states *after* RoPE; K and V
are exactly what vLLM hands to ``reshape_and_cache`` (``[batch, num_kv_heads,
tokens, head_dim]``, before grouped-query heads are repeated), and the hook may
replace them (the query is for calibration statistics only). It is installed
as a registered attention implementation (``transformers.AttentionInterface``)
that calls the hook and then the stock SDPA attention, so no model code is
patched and an absent hook reproduces the stock model bit for bit.

Used by ``vllm-nf4kv ablate`` (fake quantization, perplexity) and
``vllm-nf4kv report`` (capturing real K/V).
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

ATTN_IMPLEMENTATION = "nf4kv_hooked_sdpa"

# (layer_idx, query, key, value) -> (key, value)
# query: [batch, num_heads, tokens, head_dim]; key/value: [batch, num_kv_heads, tokens, head_dim]
KVHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_ACTIVE_HOOK: list[KVHook] = []


def _hooked_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE_HOOK:
        key, value = _ACTIVE_HOOK[-1](module.layer_idx, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _hooked_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # same causal mask as "sdpa"


@contextlib.contextmanager
def kv_hook(hook: KVHook | None) -> Iterator[None]:
    """Apply ``hook`` to every attention layer's K/V while the block runs (None: stock model)."""
    if hook is None:
        yield
        return
    _ACTIVE_HOOK.append(hook)
    try:
        yield
    finally:
        _ACTIVE_HOOK.pop()


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    num_layers: int
    num_kv_heads: int
    head_dim: int


def load_model(model_dir: str | pathlib.Path) -> LoadedModel:
    """Load a causal LM in fp32 with the hookable attention (fp32: the ablation's baseline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _register()
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); "
            f"run `make assets` for the default model or pass --model DIR"
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION
    ).eval()
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LoadedModel(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def token_windows(tokenizer, text_path: str | pathlib.Path, tokens: int, ctx: int) -> torch.Tensor:
    """The first tokens of a text as non-overlapping windows ``[tokens // ctx, ctx]``.

    Each window opens as the tokenizer opens a prompt (Gemma: with BOS, without which its
    attention behaves unlike served traffic), as ``tools.llm_measures.token_windows`` does.
    """
    if ctx < 2 or tokens < ctx:
        raise ValueError(f"need --ctx >= 2 and --tokens >= --ctx, got tokens={tokens} ctx={ctx}")
    prefix = torch.tensor(tokenizer("", add_special_tokens=True).input_ids, dtype=torch.long)
    step = ctx - prefix.numel()
    text = pathlib.Path(text_path).read_text(encoding="utf-8")
    wanted = (tokens // ctx) * step
    chars = 8 * wanted  # a prefix is enough: English runs at ~4-5 characters a token
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if ids.numel() > wanted or chars >= len(text):
            break
        chars *= 2
    if ids.numel() < wanted:
        raise ValueError(f"{text_path} has only {ids.numel()} tokens; lower --tokens below {wanted}")
    body = ids[:wanted].view(-1, step)
    return torch.cat([prefix.expand(body.shape[0], -1), body], dim=1)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, hook: KVHook | None = None) -> float:
    """Perplexity over windows ``[n, ctx]``, each scored on its own (next-token, positions 1..ctx-1)."""
    total, count = 0.0, 0
    with kv_hook(hook):
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()  # [ctx - 1, vocab]
            nll = torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum")
            total += float(nll)
            count += window.numel() - 1
    return math.exp(total / count)


@torch.inference_mode()
def capture_kv(model: torch.nn.Module, windows: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's post-RoPE K and V over the windows: ``{layer: (K, V)}``, each ``[H, n*ctx, D]``."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        seen.setdefault(layer, []).append((key[0].clone(), value[0].clone()))
        return key, value

    with kv_hook(record):
        for window in windows:
            model(window[None])
    return {
        layer: (torch.cat([k for k, _ in kv], 1), torch.cat([v for _, v in kv], 1))
        for layer, kv in sorted(seen.items())
    }
