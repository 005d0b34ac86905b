"""Closed-loop streaming load driver for an HTTP completion server: llama.cpp's llama-server
(`/completion`, api `llama`) or modserve's OpenAI API (`/v1/completions`, api `openai`), so that
both are measured by the same client.

usage: stream_driver.py --url http://127.0.0.1:PORT --api llama|openai [--concurrency 32]
         [--new-tokens 128] [--warmup 20] [--window 60] [--loras N | --modules id,id,...]
         [--seed 0] [--report OUT.json]

Each of --concurrency workers sends a request, reads its token stream to the end, and sends the
next one (closed loop). Every request decodes exactly --new-tokens tokens greedily (llama:
ignore_eos, temperature 0, cache_prompt false; openai: temperature 0, modserve.min_tokens). With
--loras N (llama) each request applies one of the server's N LoRAs, drawn uniformly at random
(`"lora": [{"id": i, "scale": 1.0}]`; the server keeps the others at scale 0); with --modules (openai) the request's
`model` is one of the listed module ids, drawn the same way.
Throughput = tokens that arrived inside the measured window (it starts after --warmup seconds
of load) / the window's length; every streamed token is time-stamped on arrival. The workers are
stopped when the window ends. Stdlib only (asyncio), HTTP/1.1 with chunked server-sent events."""
import argparse, asyncio, json, random, sys, time
from urllib.parse import urlsplit

PROMPT = "Write a short note about topic number 1:"


async def read_chunked_lines(reader):
    """Yields the lines of a chunked (or plain, until EOF) HTTP body."""
    buf = b""
    while True:
        size_line = await reader.readline()
        if not size_line:
            break
        size = int(size_line.strip().split(b";")[0] or b"0", 16)
        if size == 0:
            await reader.readline()
            break
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.rstrip(b"\r")
    if buf:
        yield buf


async def one_request(host, port, path, body, on_tokens):
    """Sends one streaming request; calls on_tokens(n) per token-carrying event. Returns the
    number of streamed tokens (checked against the count the server reports at the end)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        status = await reader.readline()
        code = int(status.split()[1])
        chunked = False
        while True:
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                break
            k, _, v = h.decode().partition(":")
            if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        if code != 200:
            rest = await reader.read()
            raise RuntimeError(f"HTTP {code}: {rest[:300]!r}")
        if chunked:
            lines = read_chunked_lines(reader)
        else:
            async def plain():
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    yield line.rstrip(b"\r\n")
            lines = plain()
        streamed, reported = 0, None
        async for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(f"server error: {ev['error']}")
            if "choices" in ev:  # OpenAI completions chunk: one per token, then usage
                if ev.get("usage"):
                    reported = ev["usage"].get("completion_tokens")
                for c in ev["choices"]:
                    if c.get("finish_reason") is None:
                        streamed += 1
                        on_tokens(1)
            else:  # llama-server: one event per token ('tokens'), a final one with stop=true
                if ev.get("stop"):
                    reported = ev.get("tokens_predicted", reported)
                    n = len(ev.get("tokens") or [])
                else:
                    n = len(ev.get("tokens") or []) or (1 if ev.get("content") else 0)
                if n:
                    streamed += n
                    on_tokens(n)
        if reported is not None and reported != streamed:
            raise RuntimeError(f"streamed {streamed} tokens, the server reported {reported}")
        return streamed
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--api", choices=["llama", "openai"], required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=float, default=20)
    ap.add_argument("--window", type=float, default=60)
    ap.add_argument("--loras", type=int, default=0)
    ap.add_argument("--modules", default="")
    ap.add_argument("--model", default="base", help="openai: the model of base requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report")
    a = ap.parse_args()
    u = urlsplit(a.url)
    host, port = u.hostname, u.port
    modules = [m for m in a.modules.split(",") if m]
    rng = random.Random(a.seed)

    def body():
        if a.api == "llama":
            b = {"prompt": PROMPT, "n_predict": a.new_tokens, "temperature": 0.0, "ignore_eos": True,
                 "cache_prompt": False, "stream": True}
            if a.loras:
                pick = rng.randrange(a.loras)
                b["lora"] = [{"id": pick, "scale": 1.0}]
            return "/completion", b, (f"lora{pick}" if a.loras else "base")
        model = rng.choice(modules) if modules else a.model
        b = {"model": model, "prompt": PROMPT, "max_tokens": a.new_tokens, "temperature": 0.0, "stream": True,
             "stream_options": {"include_usage": True}, "modserve": {"min_tokens": a.new_tokens}}
        return "/v1/completions", b, model

    t0 = time.monotonic()
    w0, w1 = t0 + a.warmup, t0 + a.warmup + a.window
    st = {"in_window": 0, "total": 0, "ok": 0, "ok_in_window": 0, "errors": 0, "short": 0, "picks": {}}
    errors = []

    def on_tokens(n):
        now = time.monotonic()
        st["total"] += n
        if w0 <= now < w1:
            st["in_window"] += n

    async def worker():
        while time.monotonic() < w1:
            path, b, label = body()
            st["picks"][label] = st["picks"].get(label, 0) + 1
            try:
                n = await one_request(host, port, path, b, on_tokens)
                st["ok"] += 1
                if w0 <= time.monotonic() < w1:
                    st["ok_in_window"] += 1
                if n != a.new_tokens:
                    st["short"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                st["errors"] += 1
                if len(errors) < 5:
                    errors.append(repr(e))
                await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(worker()) for _ in range(a.concurrency)]
    await asyncio.sleep(max(0.0, w1 - time.monotonic()))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    r = {
        "url": a.url, "api": a.api, "concurrency": a.concurrency, "new_tokens": a.new_tokens,
        "warmup_s": a.warmup, "window_s": a.window, "loras": a.loras, "modules": len(modules),
        "tokens_in_window": st["in_window"], "tok_s": round(st["in_window"] / a.window, 3),
        "tokens_total": st["total"], "requests_ok": st["ok"], "requests_ok_in_window": st["ok_in_window"],
        "requests_short": st["short"], "errors": st["errors"], "error_examples": errors,
        "distinct_adapters_used": len(st["picks"]),
    }
    out = json.dumps(r, indent=1)
    if a.report:
        open(a.report, "w").write(out + "\n")
    print(out)
    if st["errors"] or st["short"] or not st["in_window"]:
        print(f"stream_driver: {st['errors']} errors, {st['short']} requests not of {a.new_tokens} tokens, "
              f"{st['in_window']} tokens in the window: {errors}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
