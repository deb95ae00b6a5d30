"""Serving under load, continuous vs dynamic batching, in one run: head-of-line latency and throughput.

    python bench/serve_load.py                          # a random Llama of the demo's size ("mini"), 32 tokens/answer
    python bench/serve_load.py --model runs/sft/final --max-tokens 64 --requests 64

It starts two `flywheel serve` subprocesses on loopback ports, `--batching continuous` and `--batching dynamic`
(requests join only when the running batch ends), and measures each, alternating between them (`--reps` times, the
median kept, so that a change in the machine's load hits both alike):

- head of line: short requests (`--short-tokens`) sent one after another while `--long` long requests
  (`--long-tokens`) decode (from when `/health` counts them running, or with `--long-stream` from their first
  streamed token, their tokens then going out while the shorts wait); p50/p95 latency of the short ones, against
  the same short request on an idle server;
- throughput: for each concurrency C in `--levels`, C clients send chat completions back to back (`--requests` in
  all), every one asking `--max-tokens`, then again with budgets spread over 1..2 x `--max-tokens` (mixed lengths:
  dynamic batching then holds finished rows' places until the longest ends); requests/s, generated tokens/s,
  median latency. The same levels then run on the batching worker alone, in this process, each request sent by the
  end of its client's previous one (no HTTP stack and no client process sharing the CPU: on 2 cores those take
  about half of it at 32 clients), which isolates the scheduler.

The model answers with a fixed seed per request, so both schedulers generate the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx


def random_model(root: Path, size: str) -> Path:
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.tokenization import train_tokenizer

    texts = ["The capital of France is Paris. What is 12 + 30? It is 42. Reverse the word cat: tac."] * 50
    tok = train_tokenizer(texts, vocab_size=512)
    model = build_causal_lm(config_for_tokenizer(tok, size, max_position_embeddings=1024), seed=0)
    return save_pretrained(model, tok, root / "model")


def completion_request(content: str, max_tokens: int, seed: int, *, stream: bool = False) -> dict:
    """The chat completion every request of this benchmark makes: one user turn, temperature 1, a fixed seed."""
    return {
        "model": "flywheel",
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "stream": stream,
        "messages": [{"role": "user", "content": content}],
    }


async def ask(c: httpx.AsyncClient, url: str, content: str, max_tokens: int, seed: int) -> tuple[float, int]:
    """One chat completion -> (seconds, completion tokens)."""
    t0 = time.perf_counter()
    r = await c.post(url + "/v1/chat/completions", timeout=600, json=completion_request(content, max_tokens, seed))
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]


async def ask_streaming(
    c: httpx.AsyncClient, url: str, content: str, max_tokens: int, seed: int, started: asyncio.Event
) -> tuple[float, int]:
    """One streamed chat completion -> (seconds, content chunks); `started` is set at its first content chunk."""
    t0 = time.perf_counter()
    chunks = 0
    body = completion_request(content, max_tokens, seed, stream=True)
    try:
        async with c.stream("POST", url + "/v1/chat/completions", timeout=600, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                choices = json.loads(line[6:]).get("choices") if line.startswith("data: {") else None
                if choices and choices[0].get("delta", {}).get("content"):
                    chunks += 1
                    started.set()
    finally:
        started.set()  # an error must not leave the shorts waiting
    return time.perf_counter() - t0, chunks


async def decoding(c: httpx.AsyncClient, url: str, requests: int) -> None:
    """Wait until the server's worker runs `requests` requests (`/health`)."""
    while (await c.get(url + "/health")).json()["engine"]["running_requests"] < requests:
        await asyncio.sleep(0.002)


async def head_of_line(
    url: str, longs: int, long_tokens: int, shorts: int, short_tokens: int, stream: bool
) -> dict[str, float]:
    """Short requests behind long ones: their latencies, and the same short request on the idle server. The shorts
    start once the long requests are decoding (their first streamed token, or `/health` counting them) and stop when
    one of them ends."""
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=longs + 3)) as c:
        alone = [(await ask(c, url, "What is 2 + 2?", short_tokens, 7))[0] for _ in range(5)]
        started = [asyncio.Event() for _ in range(longs)]
        running = [
            asyncio.create_task(
                ask_streaming(c, url, f"Tell a long story {i}.", long_tokens, 100 + i, started[i])
                if stream
                else ask(c, url, f"Tell a long story {i}.", long_tokens, 100 + i)
            )
            for i in range(longs)
        ]
        if stream:
            for event in started:
                await event.wait()
        else:
            await decoding(c, url, longs)
        behind = []
        for _ in range(shorts):
            if any(t.done() for t in running):
                break
            behind.append((await ask(c, url, "What is 2 + 2?", short_tokens, 7))[0])
        long_results = await asyncio.gather(*running)
    if not behind:
        raise SystemExit(f"the long requests ended before any short one was sent: raise --long-tokens ({long_tokens})")
    behind.sort()
    return {
        "alone_s": statistics.median(alone),
        "p50_s": statistics.median(behind),
        "p95_s": behind[min(len(behind) - 1, round(0.95 * (len(behind) - 1)))],
        "shorts": len(behind),
        "long_tokens": statistics.mean(n for _, n in long_results),
    }


def budget(max_tokens: int, mixed: bool, i: int, j: int) -> int:
    """Tokens asked by client i's j-th request: `max_tokens`, or with `mixed` a spread of 1..2*max_tokens (mean about
    max_tokens), the same for both servers."""
    return 1 + (7919 * (1000 * i + j)) % (2 * max_tokens) if mixed else max_tokens


async def level(url: str, clients: int, per_client: int, max_tokens: int, mixed: bool) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        for j in range(per_client):
            question = f"Question {i}.{j}: what is {i} + {j}?"
            seconds, n = await ask(c, url, question, budget(max_tokens, mixed, i, j), 1000 * i + j)
            latencies.append(seconds)
            tokens += n

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {
        "requests_s": len(latencies) / elapsed,
        "tokens_s": tokens / elapsed,
        "p50_s": statistics.median(latencies),
        "requests": len(latencies),
    }


def scheduler_level(worker: Any, clients: int, per_client: int, max_tokens: int, mixed: bool) -> dict[str, float]:
    """The same closed loop on the server's batching worker alone, in this process (no HTTP, no client process, no
    client threads): each of the C clients' requests is submitted by its previous one's end event."""
    from flywheel.engine import SamplingParams
    from flywheel.serve.worker import GenRequest

    latencies: list[float] = []
    tokens = [0]
    finished = threading.Event()
    left = [clients]

    def send(i: int, j: int) -> None:
        if j == per_client:
            left[0] -= 1
            if not left[0]:
                finished.set()
            return
        t0 = time.perf_counter()

        def emit(event: tuple) -> None:  # called in the worker's thread
            if event[0] == "done":
                tokens[0] += event[3]
            elif event[0] in ("end", "error"):
                latencies.append(time.perf_counter() - t0)
                send(i, j + 1)

        params = SamplingParams(max_new_tokens=budget(max_tokens, mixed, i, j), temperature=1.0, seed=1000 * i + j)
        question = f"Question {i}.{j}: what is {i} + {j}?"
        worker.submit(GenRequest([{"role": "user", "content": question}], params, emit=emit))

    t0 = time.perf_counter()
    for i in range(clients):
        send(i, 0)
    finished.wait()
    elapsed = time.perf_counter() - t0
    return {"tokens_s": tokens[0] / elapsed, "p50_s": statistics.median(latencies), "requests": len(latencies)}


def start_server(model: Path, db: Path, port: int, batching: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flywheel", "serve", str(model), "--db", str(db), "--port", str(port)]
    cmd += ["--max-batch", "32", "--max-tokens-limit", "1024", "--log-api", "false", "--batching", batching]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start")


def measure(urls: dict[str, str], args: argparse.Namespace) -> dict[str, dict]:
    """Every measurement alternates between the servers, `--reps` times; the median of each is kept."""
    runs: dict[str, dict] = {b: {} for b in urls}
    for url in urls.values():
        asyncio.run(level(url, 2, 2, args.max_tokens, False))  # warm-up
    tests = [
        (
            "hol",
            lambda url: head_of_line(
                url, args.long, args.long_tokens, args.shorts, args.short_tokens, args.long_stream
            ),
        )
    ]
    for mixed in (False, True):
        for clients in (int(x) for x in args.levels.split(",")):
            per_client = max(1, args.requests // clients)
            tests.append(
                ((clients, mixed), lambda url, c=clients, p=per_client, m=mixed: level(url, c, p, args.max_tokens, m))
            )
    for name, test in tests:
        samples: dict[str, list[dict]] = {b: [] for b in urls}
        for _ in range(args.reps):
            for b, url in urls.items():
                samples[b].append(asyncio.run(test(url)))
        for b, results in samples.items():
            runs[b][name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random Llama of --size)")
    parser.add_argument("--size", default="mini", help="size of the random Llama (flywheel.models.TINY_SIZES)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer in the throughput levels")
    parser.add_argument("--requests", type=int, default=256, help="requests per throughput level (total)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--long", type=int, default=1, help="long requests running during the head-of-line test")
    parser.add_argument(
        "--long-tokens", type=int, default=960, help="tokens of each long request (the model holds 1024)"
    )
    parser.add_argument(
        "--long-stream", action="store_true", help="stream the long requests (their tokens go out while shorts wait)"
    )
    parser.add_argument("--shorts", type=int, default=20, help="short requests sent behind the long ones")
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (the median is shown)")
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(Path(tmp), args.size)
        servers, urls = [], {}
        try:
            for i, b in enumerate(("continuous", "dynamic")):  # both up; only the one being measured is busy
                servers.append(start_server(model, Path(tmp) / f"{b}.db", args.port + i, b))
                urls[b] = f"http://127.0.0.1:{args.port + i}"
            runs = measure(urls, args)
        finally:
            for server in servers:
                server.terminate()
                server.wait()
        alone = measure_scheduler(model, args)
    print(f"model {model.name if args.model else 'random ' + args.size}, CPU threads {torch_threads()}")
    print(
        f"\nhead of line: {args.short_tokens}-token requests behind {args.long} x {args.long_tokens}-token ones "
        f"({'streamed' if args.long_stream else 'not streamed'}) "
        "(latency, and x the same request on an idle server)"
    )
    print(f"{'batching':>11} {'alone s':>8} {'p50 s':>8} {'p95 s':>8} {'p50 x':>6} {'p95 x':>6} {'shorts':>6}")
    for b, r in runs.items():
        h = r["hol"]
        print(
            f"{b:>11} {h['alone_s']:>8.3f} {h['p50_s']:>8.3f} {h['p95_s']:>8.3f} {h['p50_s'] / h['alone_s']:>6.1f} "
            f"{h['p95_s'] / h['alone_s']:>6.1f} {h['shorts']:>6}"
        )
    for where, results in (("the servers, over HTTP", runs), ("the batching worker alone, in process", alone)):
        for mixed in (False, True):
            lengths = f"1-{2 * args.max_tokens} tokens (mixed)" if mixed else f"{args.max_tokens} tokens"
            print(f"\nthroughput of {where}: {args.requests} requests of {lengths} per level")
            print(
                f"{'clients':>8} " + " ".join(f"{b + ' tok/s':>17} {'p50 s':>7}" for b in results) + f" {'ratio':>6}"
            )
            for clients in (int(x) for x in args.levels.split(",")):
                c, d = results["continuous"][clients, mixed], results["dynamic"][clients, mixed]
                print(
                    f"{clients:>8} {c['tokens_s']:>17.0f} {c['p50_s']:>7.2f} {d['tokens_s']:>17.0f} "
                    f"{d['p50_s']:>7.2f} {c['tokens_s'] / d['tokens_s']:>6.2f}"
                )


def measure_scheduler(model: Path, args: argparse.Namespace) -> dict[str, dict]:
    """The throughput levels on the batching worker alone (`scheduler_level`), alternating between the schedulers
    `--reps` times, the median kept. One worker exists at a time: each thread that runs torch ops has its own OpenMP
    team, and an idle second worker's team slowed the measured one (one client: 630 against 1870 tokens/s)."""
    from flywheel.serve.worker import BatchWorker, ServedModel

    served = ServedModel.load(model)
    levels = [(c, m) for m in (False, True) for c in (int(x) for x in args.levels.split(","))]
    samples: dict[str, dict] = {b: {key: [] for key in levels} for b in ("continuous", "dynamic")}
    for _ in range(args.reps):
        for b in samples:
            worker = BatchWorker(served, max_batch=32, batching=b)
            worker.start()
            try:
                scheduler_level(worker, 2, 2, args.max_tokens, False)  # warm-up
                for clients, mixed in levels:
                    per_client = max(1, args.requests // clients)
                    result = scheduler_level(worker, clients, per_client, args.max_tokens, mixed)
                    samples[b][clients, mixed].append(result)
            finally:
                worker.stop()
    return {
        b: {key: {k: statistics.median(r[k] for r in results) for k in results[0]} for key, results in runs.items()}
        for b, runs in samples.items()
    }


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
