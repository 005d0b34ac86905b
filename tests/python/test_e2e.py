"""End-to-end test of a running `modserve serve` from the official Python gRPC client (grpcio).

Run by scripts/e2e-python.sh, which starts the server and generates the stubs from
proto/modserve/v1/modserve.proto. Usage:

    python tests/python/test_e2e.py --target 127.0.0.1:PORT --stubs DIR --cases tests/fixtures/parity/cases.json

Expected values come from tests/fixtures/parity/cases.json (greedy tokens computed with HF
transformers + PEFT), never from modserve itself. The server must run with
`--adapter-root tests/fixtures/parity --weights f32` so its modules (registered at start by folder
name) and numerics match the reference kit.

Prints one line per test and a final `N passed, M failed`; exits 1 when anything failed.
"""

import argparse
import json
import sys
import time
import traceback

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

INFERENCE = "modserve.v1.Inference"
ADAPTERS = "modserve.v1.Adapters"
PROMPT0 = [504, 2365, 6354, 16438]  # "The quick brown fox", prompt 0 of the kit


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="host:port of the server")
    p.add_argument("--stubs", required=True, help="folder holding the generated modserve/v1/*_pb2*.py")
    p.add_argument("--cases", required=True, help="tests/fixtures/parity/cases.json")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each generation RPC (s)")
    p.add_argument("--weights", choices=["f32", "quantized"], default="f32",
                   help="the server's --weights: f32 must reproduce the kit's greedy tokens exactly; quantized "
                        "(8/4-bit base) must put the kit's first token in its top 5 and apply every delta")
    return p.parse_args()


ARGS = parse_args()
sys.path.insert(0, ARGS.stubs)
from modserve.v1 import modserve_pb2 as pb  # noqa: E402  (generated at run time)
from modserve.v1 import modserve_pb2_grpc as pb_grpc  # noqa: E402

CASES = json.load(open(ARGS.cases))
CHANNEL = grpc.insecure_channel(ARGS.target)
grpc.channel_ready_future(CHANNEL).result(timeout=30)

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def greedy(case, prompt=0):
    return [int(t) for t in CASES["cases"][case]["greedy"][prompt]]


QUANTIZED = ARGS.weights == "quantized"


def check_tokens(tokens, case, first_top5=None):
    """f32: the kit's greedy tokens exactly. Quantized: the kit's first greedy token is among our
    first step's top 5 (as tests/parity_adapters.rs checks in Rust)."""
    if not QUANTIZED:
        assert tokens == greedy(case), f"tokens {tokens}\n     want {greedy(case)}"
        return
    assert first_top5 is not None, "quantized checks need top_logprobs"
    assert greedy(case)[0] in first_top5, f"{case}: kit first token {greedy(case)[0]} not in our top 5 {first_top5}"


def stream(request):
    """Streams a generation; returns the chunks."""
    stub = pb_grpc.InferenceStub(CHANNEL)
    return list(stub.GenerateStream(request, timeout=ARGS.timeout))


def check_stream(chunks, case, n):
    assert chunks, "no chunks"
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == n, f"{len(tokens)} tokens, want {n}"
    top5 = [e.id for e in chunks[0].top_logprobs[0].entries] if chunks[0].top_logprobs else None
    check_tokens(tokens, case, top5)
    last = chunks[-1]
    assert last.finish_reason == "length", f"last finish_reason {last.finish_reason!r}"
    assert all(c.finish_reason == "" for c in chunks[:-1]), "finish_reason set before the last chunk"
    assert last.HasField("usage"), "last chunk has no usage"
    assert last.usage.generated_tokens == n, f"usage.generated_tokens {last.usage.generated_tokens} != {n}"
    assert last.usage.prompt_tokens == len(PROMPT0), f"usage.prompt_tokens {last.usage.prompt_tokens}"
    # Text deltas are Python str (protobuf validated them as UTF-8); their concatenation must
    # survive a UTF-8 round trip and hold no replacement characters from split code points.
    text = "".join(c.text for c in chunks)
    assert text.encode("utf-8").decode("utf-8") == text
    assert "\ufffd" not in text, f"replacement character in streamed text {text!r}"
    assert text.strip(), "empty streamed text"
    return text


@test
def health_serving():
    h = health_pb2_grpc.HealthStub(CHANNEL)
    for service in ("", INFERENCE):
        r = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, f"{service!r}: {r.status}"


@test
def reflection_lists_services():
    # The server implements reflection v1 (grpc.reflection.v1.ServerReflection).
    from grpc_reflection.v1alpha import reflection_pb2  # message layout shared with v1

    method = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
    call = CHANNEL.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert len(responses) == 1, responses
    names = [s.name for s in responses[0].list_services_response.service]
    for want in (INFERENCE, ADAPTERS, "grpc.health.v1.Health"):
        assert want in names, f"{want} not in {names}"
    # The descriptor of the inference service is served too.
    responses = list(call(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=INFERENCE)]), timeout=10))
    assert responses[0].HasField("file_descriptor_response"), responses[0]
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in responses[0].file_descriptor_response.file_descriptor_proto]
    services = [f"{f.package}.{s.name}" for f in files for s in f.service]
    assert INFERENCE in services, services


@test
def adapters_list():
    r = pb_grpc.AdaptersStub(CHANNEL).List(pb.ListRequest(), timeout=10)
    ids = {m.module_id: m for m in r.modules}
    for want in ("lora_qv_r4", "lora_all_r8", "lora_all_r4_rslora", "poly_qvup", "sft_lang", "sft_task", "ewr"):
        assert want in ids, f"{want} not in {sorted(ids)}"
    assert ids["lora_qv_r4"].kind == "lora", ids["lora_qv_r4"]
    assert ids["poly_qvup"].kind == "poly", ids["poly_qvup"]


@test
def stream_lora_matches_transformers():
    n = 16
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT0),
        max_new_tokens=n,
        min_new_tokens=n,
        deltas=[pb.DeltaRef(module_id="lora_qv_r4", scale=1.0)],
        request_id="py-e2e-lora",
        top_logprobs=5,
    )
    chunks = stream(req)
    text = check_stream(chunks, "lora_qv_r4", n)
    # One chunk per generated token (the last one may carry no token).
    assert len([c for c in chunks if c.token_ids]) == n, f"{len(chunks)} chunks"
    print(f"    lora_qv_r4: {text!r}")


@test
def stream_poly_route_matches_transformers():
    n = 16
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT0),
        max_new_tokens=n,
        min_new_tokens=n,
        route=pb.PolyRoute(inventory_id="poly_qvup", task_id=1),
        request_id="py-e2e-poly",
        top_logprobs=5,
    )
    text = check_stream(stream(req), "poly_task1", n)
    print(f"    poly_task1: {text!r}")


@test
def stream_composition_matches_transformers():
    n = 16
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT0),
        max_new_tokens=n,
        min_new_tokens=n,
        deltas=[pb.DeltaRef(module_id="lora_qv_r4", scale=1.0), pb.DeltaRef(module_id="lora_all_r8", scale=0.5)],
        top_logprobs=5,
    )
    check_stream(stream(req), "compose_qv1_all05", n)


@test
def unary_matches_stream():
    n = 16
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT0),
        max_new_tokens=n,
        min_new_tokens=n,
        deltas=[pb.DeltaRef(module_id="lora_qv_r4", scale=1.0)],
    )
    r = pb_grpc.InferenceStub(CHANNEL).Generate(req, timeout=ARGS.timeout)
    streamed = [t for c in stream(req) for t in c.token_ids]
    assert list(r.token_ids) == streamed, (list(r.token_ids), streamed)
    if not QUANTIZED:
        assert list(r.token_ids) == greedy("lora_qv_r4"), list(r.token_ids)
    assert r.finish_reason == "length" and r.usage.generated_tokens == n, (r.finish_reason, r.usage)


@test
def every_delta_moves_the_logprobs():
    # A composition silently not applied would give the base model's logprobs.
    def first_logprobs(**kw):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT0), max_new_tokens=4, min_new_tokens=4, **kw)
        return list(pb_grpc.InferenceStub(CHANNEL).Generate(req, timeout=ARGS.timeout).logprobs)

    base = first_logprobs()
    for kw in (
        {"deltas": [pb.DeltaRef(module_id="lora_qv_r4", scale=1.0)]},
        {"deltas": [pb.DeltaRef(module_id="sft_lang", scale=1.0)]},
        {"route": pb.PolyRoute(inventory_id="poly_qvup", task_id=1)},
    ):
        got = first_logprobs(**kw)
        moved = max(abs(a - b) for a, b in zip(got, base))
        assert moved > 1e-3, f"{kw}: logprobs moved by {moved} only"



@test
def unknown_module_is_not_found():
    req = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=PROMPT0),
        max_new_tokens=4,
        deltas=[pb.DeltaRef(module_id="no_such_module_xyz", scale=1.0)],
    )
    try:
        stream(req)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, f"{e.code()}: {e.details()}"
        md = dict(e.trailing_metadata() or ())
        assert md.get("modserve-error-code"), f"no modserve-error-code in {md}"
        return
    raise AssertionError("unknown module streamed without an error")


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
