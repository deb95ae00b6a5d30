"""Serve throughput at 1, 8 and 32 concurrent clients: does batching pay?

    python bench/serve_load.py                          # a tiny random Llama (h128, 2 layers), 32 tokens/answer
    python bench/serve_load.py --model runs/sft/final --max-tokens 64 --requests 64

Starts `flywheel serve` as a subprocess on a free loopback port, then for each concurrency C runs C clients that send
chat completions back to back (`--requests` each for C = 1, scaled so every level sends about the same total) and
prints requests/s, generated tokens/s, median latency, and the server's batching counters (rows per decoded batch).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def tiny_model(root: Path) -> Path:
    from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
    from flywheel.tokenization import train_tokenizer

    texts = ["The capital of France is Paris. What is 12 + 30? It is 42. Reverse the word cat: tac."] * 50
    tok = train_tokenizer(texts, vocab_size=512)
    model = build_causal_lm(config_for_tokenizer(tok, "tiny", max_position_embeddings=512), seed=0)
    return save_pretrained(model, tok, root / "model")


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0

    async def client(c: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        for j in range(per_client):
            t0 = time.perf_counter()
            r = await c.post(
                url + "/v1/chat/completions",
                timeout=600,
                json={
                    "model": "flywheel",
                    "max_tokens": max_tokens,
                    "temperature": 1.0,
                    "messages": [{"role": "user", "content": f"Question {i}.{j}: what is {i} + {j}?"}],
                },
            )
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a tiny random Llama)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per level (total)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--port", type=int, default=18765)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else tiny_model(Path(tmp))
        cmd = [
            sys.executable,
            "-m",
            "flywheel",
            "serve",
            str(model),
            "--db",
            str(Path(tmp) / "bench.db"),
            "--port",
            str(args.port),
            "--max-batch",
            "32",
            "--log-api",
            "false",
        ]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}"
        try:
            for _ in range(600):
                try:
                    httpx.get(url + "/v1/models", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            asyncio.run(level(url, 2, 2, args.max_tokens))  # warm-up
            print(f"model {model.name}, max_tokens {args.max_tokens}, {args.requests} requests per level")
            print(f"{'clients':>8} {'req/s':>8} {'tok/s':>8} {'p50 s':>8}")
            results = {}
            for clients in (int(x) for x in args.levels.split(",")):
                per_client = max(1, args.requests // clients)
                r = results[clients] = asyncio.run(level(url, clients, per_client, args.max_tokens))
                print(f"{clients:>8} {r['requests_s']:>8.2f} {r['tokens_s']:>8.0f} {r['p50_s']:>8.2f}")
            base = results[min(results)]["tokens_s"]
            ratios = ", ".join(f"{c}: {r['tokens_s'] / base:.1f}x" for c, r in results.items())
            print(f"tokens/s vs 1 client: {ratios}")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
