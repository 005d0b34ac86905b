"""Peer: HF transformers + PEFT, one batch decoded greedily, first with the base model, then with
PEFT's mixed-adapter batch (`adapter_names=`: row i uses adapter i mod N).
usage: peft_bench.py HF_MODEL_DIR ADAPTERS_DIR BATCH NEW_TOKENS N_ADAPTERS THREADS [REPORT.json]
ADAPTERS_DIR holds lora{i}/a{i}/ (make_peft_adapters.py). Throughput = BATCH * NEW_TOKENS / the
generate() wall time (prefill included), after one short warm-up generate of each model."""
import glob, json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

src, adir, batch, new, nad, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
report = sys.argv[7] if len(sys.argv) > 7 else None
torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(src)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
base.eval()
prompts = [f"Write a short note about topic number {i}:" for i in range(batch)]
enc = tok(prompts, return_tensors="pt", padding=True)


def run(model, n, **kw):
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
    dt = time.perf_counter() - t
    assert out.shape[1] - enc["input_ids"].shape[1] == n, out.shape
    return dt


run(base, 2)
dt_base = run(base, new)
paths = sorted(glob.glob(f"{adir}/lora*/a*"), key=lambda p: int(p.split("/lora")[-1].split("/")[0]))[:nad]
if len(paths) < nad:
    sys.exit(f"peft_bench: {len(paths)} adapters in {adir}, {nad} asked (setup.sh step adapters)")
m = PeftModel.from_pretrained(base, paths[0], adapter_name="a0")
for i, p in enumerate(paths[1:], 1):
    m.load_adapter(p, adapter_name=f"a{i}")
m.eval()
names = [f"a{i % len(paths)}" for i in range(batch)]
run(m, 2, adapter_names=names)
dt_mixed = run(m, new, adapter_names=names)
toks = batch * new
r = {"batch": batch, "new_tokens": new, "adapters": len(paths), "threads": threads,
     "torch": torch.__version__, "base_tok_s": round(toks / dt_base, 2), "mixed_tok_s": round(toks / dt_mixed, 2),
     "mixed_over_base": round(dt_base / dt_mixed, 3)}
print(json.dumps(r))
if report:
    open(report, "w").write(json.dumps(r, indent=1) + "\n")
