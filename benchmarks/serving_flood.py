"""One token floods the inference service; how long does another token wait?

Serves the bundled MiniLM on loopback (``fedprompt serve``'s app, its default admission and
limits), measures the median latency of a victim token's requests alone, then again while a
flooding token sends requests back to back from ``--flood-workers`` threads in another process
(bounded: the flood stops when the victim's measurement ends), and prints the ratio of the two
medians. The target is at most 2: the victim waits for at most the one request in progress
(round-robin turns), whatever the flood keeps waiting or sends.

    python benchmarks/serving_flood.py
    python benchmarks/serving_flood.py --flood-workers 32 --requests 60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VICTIM, GREEDY = "victim-token-0123456789", "greedy-token-0123456789"


def body(tokenizer, candidates: int, examples: int, seed: int) -> dict:
    ids = tokenizer("a slow and dull film, but the acting is fine")["input_ids"]
    return {
        "projection": {"seed": seed, "dim": 50, "num_tokens": 5, "scale": 1.0},
        "head": {"kind": "similarity", "descriptions": ["It was terrible.", "It was great."]},
        "z": [[0.01 * (i + 1)] * 50 for i in range(candidates)],
        "input_ids": [ids] * examples,
    }


def flood(url: str, payload: dict, workers: int, stop, sent) -> None:
    """Worker threads that POST back to back (ignoring refusals) until ``stop`` is set."""
    import threading

    import httpx

    def loop() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                response = client.post(
                    "/v1/logits", json=payload, headers={"Authorization": f"Bearer {GREEDY}"}
                )
                with sent.get_lock():
                    sent.value += 1 if response.status_code == 200 else 0

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def latencies(client, payload: dict, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        response = client.post("/v1/logits", json=payload, headers={"Authorization": f"Bearer {VICTIM}"})
        out.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise SystemExit(f"the victim's request was refused: {response.status_code} {response.text}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40, help="Victim requests per measurement.")
    parser.add_argument("--flood-workers", type=int, default=16, help="Threads of the flooding token.")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the service.")
    args = parser.parse_args()

    import httpx
    import torch

    from fedprompt.serving import InferenceService, create_app, serve_in_thread
    from prompt_modules.hf_text import HFTextBackbone

    torch.set_num_threads(args.threads)
    backbone = HFTextBackbone.load("bundled:all-MiniLM-L6-v2", head="none", max_length=32)
    service = InferenceService(backbone, "bundled:all-MiniLM-L6-v2")
    app = create_app(service, {"victim": VICTIM, "greedy": GREEDY})
    payload = body(backbone.tokenizer, args.candidates, args.examples, seed=1)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        latencies(client, payload, 3)  # build the projection, warm up
        alone = latencies(client, payload, args.requests)
        stop, sent = multiprocessing.Event(), multiprocessing.Value("i", 0)
        greedy_payload = body(backbone.tokenizer, args.candidates, args.examples, seed=1)
        process = multiprocessing.Process(
            target=flood, args=(url, greedy_payload, args.flood_workers, stop, sent)
        )
        process.start()
        try:
            while not service.turns.pending("greedy"):  # the flood has reached the model
                time.sleep(0.01)
            flooded = latencies(client, payload, args.requests)
        finally:
            stop.set()
            process.join(120)
        usage = service.usage("greedy")
    ratio = statistics.median(flooded) / statistics.median(alone)
    print(
        json.dumps(
            {
                "victim_median_alone_s": statistics.median(alone),
                "victim_median_flooded_s": statistics.median(flooded),
                "ratio": ratio,
                "greedy_requests_answered": usage.requests,
                "flood_workers": args.flood_workers,
                "requests": args.requests,
            }
        )
    )
    print(
        f"victim median latency: {statistics.median(alone) * 1000:.1f} ms alone, "
        f"{statistics.median(flooded) * 1000:.1f} ms under a {args.flood_workers}-thread flood "
        f"({usage.requests} of the flood's requests answered): {ratio:.2f}x (target <= 2x)"
    )


if __name__ == "__main__":
    main()
