"""Export an HF-format (safetensors, float32) copy of a GGUF model, for transformers, PEFT and
llama.cpp's convert_lora_to_gguf.py (which reads the base model's config.json).
The weights are the GGUF's, dequantized, so transformers runs the same model as modserve and llama.cpp.
usage: export_hf.py MODEL.gguf OUT_DIR"""
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
cfg = src.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
cfg.torch_dtype = torch.float32
dst = LlamaForCausalLM(cfg)
missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
if missing or unexpected:
    sys.exit(f"export_hf: missing {missing} unexpected {unexpected}")
dst.tie_weights()
dst.save_pretrained(out)
tok.save_pretrained(out)
print(f"export_hf: {gguf} -> {out} ({sum(p.numel() for p in dst.parameters())} parameters)")
