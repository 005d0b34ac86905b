"""End-to-end test of modserve's OpenAI-compatible HTTP API from the official `openai` Python
package, beside the gRPC API from grpcio, against one running `modserve serve --http-listen`.

Run by scripts/e2e-python.sh. Usage:

    python tests/python/test_openai.py --grpc 127.0.0.1:PORT --http 127.0.0.1:PORT --stubs DIR \
        --cases tests/fixtures/parity/cases.json

What it checks: chat and completions, streamed and not, for the base model, one LoRA, a named
composition (saved over gRPC), an inline composition expression and a Poly route; the tokens equal
the gRPC result for the same request, and (for the LoRA and the Poly route) the gRPC tokens equal
the HF transformers + PEFT greedy tokens of tests/fixtures/parity/cases.json; logprobs present;
OpenAI-shaped errors for an unknown model and for n = 2; and the stock grpcio-reflection client
(v1alpha, ProtoReflectionDescriptorDatabase) lists the services.

Prints one line per test and a final `N passed, M failed`; exits 1 when anything failed.
"""

import argparse
import json
import sys
import time
import traceback

import grpc
import openai

p = argparse.ArgumentParser()
p.add_argument("--grpc", required=True)
p.add_argument("--http", required=True)
p.add_argument("--stubs", required=True)
p.add_argument("--cases", required=True)
p.add_argument("--weights", choices=["f32", "quantized"], default="f32")
ARGS = p.parse_args()
sys.path.insert(0, ARGS.stubs)
from modserve.v1 import modserve_pb2 as pb  # noqa: E402  (generated at run time)
from modserve.v1 import modserve_pb2_grpc as pb_grpc  # noqa: E402

CASES = json.load(open(ARGS.cases))
CHANNEL = grpc.insecure_channel(ARGS.grpc)
grpc.channel_ready_future(CHANNEL).result(timeout=30)
INFERENCE = pb_grpc.InferenceStub(CHANNEL)
ADAPTERS = pb_grpc.AdaptersStub(CHANNEL)
CLIENT = openai.OpenAI(base_url=f"http://{ARGS.http}/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)

PROMPT0 = [504, 2365, 6354, 16438]  # prompt 0 of the kit
QUESTION = "What is the capital of France?"
N = 8
# model -> the kit case whose HF greedy tokens the gRPC result must equal (None: no kit case).
MODELS = {
    "base": "base",
    "lora_qv_r4": "lora_qv_r4",
    "kit_lang_task": "sft_lang_task",  # saved below as sft_lang+sft_task
    "lora_qv_r4+lora_all_r8@0.5": "compose_qv1_all05",
    "poly_qvup#task=1": "poly_task1",
}
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def grpc_generate(model, prompt_ids=None, chat_user=None):
    req = pb.GenerateRequest(max_new_tokens=N, min_new_tokens=0, model=model)
    if prompt_ids is not None:
        req.token_ids.ids.extend(prompt_ids)
    else:
        req.chat_user = chat_user
    return INFERENCE.Generate(req, timeout=120)


@test
def stock_reflection_client_lists_services():
    # grpcio-reflection's own client speaks v1alpha.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(CHANNEL)
    services = set(db.get_services())
    for want in ("modserve.v1.Inference", "modserve.v1.Adapters", "grpc.health.v1.Health"):
        assert want in services, f"{want} not in {services}"
    fd = db.FindFileContainingSymbol("modserve.v1.Inference")
    assert fd.package == "modserve.v1", fd.package


@test
def save_a_named_composition_over_grpc():
    info = ADAPTERS.SaveComposition(pb.SaveCompositionRequest(name="kit_lang_task", expression="sft_lang+sft_task"), timeout=10)
    assert info.expression == "sft_lang+sft_task", info
    assert not info.missing_modules, info


@test
def models_lists_base_modules_and_compositions():
    ids = {m.id for m in CLIENT.models.list()}
    for want in ("base", "lora_qv_r4", "poly_qvup", "kit_lang_task"):
        assert want in ids, f"{want} not in {sorted(ids)}"


@test
def grpc_matches_the_kit():
    # f32: exactly the kit's greedy tokens; quantized: the kit's first token among our top 5.
    for model, case in MODELS.items():
        want = [int(t) for t in CASES["cases"][case]["greedy"][0]][:N]
        if ARGS.weights == "quantized":
            req = pb.GenerateRequest(max_new_tokens=1, model=model, top_logprobs=5)
            req.token_ids.ids.extend(PROMPT0)
            top5 = [e.id for e in INFERENCE.Generate(req, timeout=120).top_logprobs[0].entries]
            assert want[0] in top5, f"{model}: the kit's first token {want[0]} is not in our top 5 {top5}"
            continue
        got = list(grpc_generate(model, prompt_ids=PROMPT0).token_ids)
        assert got == want, f"{model}: gRPC {got} != transformers {want}"


@test
def completions_match_grpc():
    for model in MODELS:
        want = grpc_generate(model, prompt_ids=PROMPT0).text
        r = CLIENT.completions.create(model=model, prompt=PROMPT0, max_tokens=N, temperature=0, logprobs=2)
        c = r.choices[0]
        assert c.text == want, f"{model}: HTTP {c.text!r} != gRPC {want!r}"
        assert c.logprobs is not None and len(c.logprobs.token_logprobs) == N, c.logprobs
        assert "".join(c.logprobs.tokens) == want
        assert all(len(t) == 2 for t in c.logprobs.top_logprobs), c.logprobs.top_logprobs
        assert r.usage.completion_tokens == N and r.usage.prompt_tokens == len(PROMPT0), r.usage
        assert c.finish_reason == "length", c.finish_reason


@test
def streamed_completions_match_grpc():
    for model in MODELS:
        want = grpc_generate(model, prompt_ids=PROMPT0).text
        text, usage, finish = "", None, None
        for chunk in CLIENT.completions.create(
            model=model, prompt=PROMPT0, max_tokens=N, temperature=0, stream=True, stream_options={"include_usage": True}
        ):
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        assert text == want, f"{model}: streamed {text!r} != gRPC {want!r}"
        assert usage is not None and usage.completion_tokens == N, usage
        assert finish == "length", finish


@test
def chat_matches_grpc():
    for model in MODELS:
        want = grpc_generate(model, chat_user=QUESTION)
        r = CLIENT.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=N, temperature=0, logprobs=True, top_logprobs=2
        )
        msg = r.choices[0].message
        assert msg.role == "assistant" and msg.content == want.text, f"{model}: {msg.content!r} != {want.text!r}"
        lp = r.choices[0].logprobs.content
        assert len(lp) == len(want.token_ids) == r.usage.completion_tokens, (len(lp), len(want.token_ids))
        assert all(len(t.top_logprobs) == 2 for t in lp)
        for got, ref in zip(lp, want.logprobs):
            assert abs(got.logprob - ref) < 1e-4, (got.logprob, ref)


@test
def streamed_chat_matches_grpc():
    for model in MODELS:
        want = grpc_generate(model, chat_user=QUESTION).text
        parts, roles = [], []
        for chunk in CLIENT.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=N, temperature=0, stream=True
        ):
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                parts.append(c.delta.content or "")
        assert "".join(parts) == want, f"{model}: {''.join(parts)!r} != {want!r}"
        assert roles == ["assistant"], roles


@test
def unknown_model_is_404():
    try:
        CLIENT.completions.create(model="no_such_module", prompt="x", max_tokens=1)
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
        return
    raise AssertionError("an unknown model was accepted")


@test
def n_above_one_is_400():
    try:
        CLIENT.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=1, n=2)
    except openai.BadRequestError as e:
        assert e.body["code"] == "unsupported_field", e.body
        assert "`n`" in e.body["message"], e.body
        return
    raise AssertionError("n=2 was accepted")


def main():
    passed = failed = 0
    for fn in TESTS:
        t0 = time.monotonic()
        try:
            fn()
        except Exception:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {fn.__name__} ({time.monotonic() - t0:.1f}s)")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {fn.__name__} ({time.monotonic() - t0:.1f}s)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
