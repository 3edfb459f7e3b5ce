"""Load and soak test over REST: many clients at once, then many runs in a row, against a real ComfyUI server
on 127.0.0.1 with this pack and tiny random weights. Prints its figures; exits 1 if a job was lost, ran twice,
failed, or memory grew past the bound.

    .runtime/venv/bin/python -m scripts.soak --prompts 200 --clients 8 --sequential 100 --size 64

Each client does what a shop's integration does: POST /prompt, then poll /history/<id> until it is done.
Every prompt has its own seed and file prefix, so "exactly once" and "distinct outputs" can be checked on
disk. Standard library only (plus the server harness next to this file); tests/test_hardening.py runs a
bounded version of the same functions.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


from zimage_dev.comfy_server import ComfyServer, execution_error, write_tiny_models


def job(seed: int, prefix: str, size: int = 64, steps: int = 8, prompt: str = "a ceramic mug, studio light") -> dict:
    """The pack's text-to-image graph in API format, self-contained (no dependency on workflows/)."""
    return {
        "3": {"class_type": "ZImageTurboCheckpointLoader",
              "inputs": {"ckpt_name": "z-image-turbo.safetensors", "weight_dtype": "auto"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["3", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["3", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "ZImageTurboSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 1.0, "shift": 3.0, "denoise": 1.0, "model": ["3", 0],
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": ["10", 0], "vae": ["3", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }


@dataclass
class LoadFigures:
    submitted: int = 0
    accepted: int = 0                    # /prompt answered 200
    completed: int = 0                   # /history says success and exactly one PNG with its prefix exists
    failed: list[str] = field(default_factory=list)
    lost: int = 0                        # accepted, but absent from /history
    duplicates: int = 0                  # a prefix with more than one file, or a prompt id given twice
    distinct_outputs: int = 0
    history_complete: bool = False       # GET /history lists every accepted prompt with its outputs
    seconds: float = 0.0

    def ok(self) -> bool:
        return (self.completed == self.submitted and not self.failed and self.lost == 0 and self.duplicates == 0
                and self.distinct_outputs == self.submitted and self.history_complete)


def run_concurrent(server: ComfyServer, prompts: int, clients: int, size: int = 64, steps: int = 8,
                   tag: str = "load", timeout: float = 600) -> LoadFigures:
    """`clients` threads share `prompts` prompts; each posts one, waits for it, then posts the next."""
    fig = LoadFigures(submitted=prompts)
    lock = threading.Lock()
    todo = list(range(prompts))
    ids: dict[int, str] = {}
    started = time.monotonic()

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            status, body = server.post_prompt(job(seed=1_000_000 + i, prefix=f"{tag}_{i:05d}", size=size,
                                                  steps=steps))
            if status != 200:
                with lock:
                    fig.failed.append(f"#{i}: /prompt answered {status}: {str(body)[:300]}")
                continue
            with lock:
                ids[i] = body["prompt_id"]
            try:
                entry = server.wait(body["prompt_id"], timeout=timeout)
            except Exception as e:  # noqa: BLE001  (a lost job is a figure, not a crash of the soak)
                with lock:
                    fig.failed.append(f"#{i}: {e}")
                continue
            if entry["status"]["status_str"] != "success":
                with lock:
                    fig.failed.append(f"#{i}: {execution_error(entry)}")

    threads = [threading.Thread(target=client, name=f"client-{c}") for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fig.seconds = round(time.monotonic() - started, 1)
    fig.accepted = len(ids)
    fig.duplicates += len(ids) - len(set(ids.values()))

    history = server.get(f"/history?max_items={prompts * 4 + 1000}")
    hashes = []
    for i, pid in ids.items():
        files = sorted(server.output.glob(f"{tag}_{i:05d}_*.png"))
        entry = history.get(pid)
        if entry is None:
            fig.lost += 1                   # accepted, yet the server has no record of it ever finishing
            continue
        if len(files) > 1:
            fig.duplicates += 1             # the same prompt saved more than once
        if entry["status"]["status_str"] == "success" and files:
            fig.completed += 1
            hashes.append(hashlib.sha256(files[0].read_bytes()).hexdigest())
    fig.distinct_outputs = len(set(hashes))
    fig.history_complete = all(pid in history and history[pid].get("outputs", {}).get("11") for pid in ids.values())
    return fig


@dataclass
class MemoryFigures:
    runs: int = 0
    failed: int = 0
    rss_before_kb: int = 0               # before the first of these runs
    rss_start_kb: int = 0                # after the warm-up runs (models loaded, caches filled)
    rss_end_kb: int = 0
    seconds: float = 0.0

    @property
    def growth_mb(self) -> float:
        return (self.rss_end_kb - self.rss_start_kb) / 1024


def run_sequential(server: ComfyServer, runs: int, size: int = 64, steps: int = 8, warmup: int = 3,
                   tag: str = "seq") -> MemoryFigures:
    """`warmup` runs, then RSS, then `runs` runs one after another (each a new seed, so nothing is cached
    but the loader), then RSS again."""
    fig = MemoryFigures(runs=runs, rss_before_kb=server.rss_kb())
    for i in range(warmup):
        server.run(job(seed=2_000_000 + i, prefix=f"{tag}_warm_{i}", size=size, steps=steps))
    fig.rss_start_kb = server.rss_kb()
    started = time.monotonic()
    for i in range(runs):
        try:
            server.run(job(seed=3_000_000 + i, prefix=f"{tag}_{i:05d}", size=size, steps=steps))
        except AssertionError:
            fig.failed += 1
    fig.seconds = round(time.monotonic() - started, 1)
    fig.rss_end_kb = server.rss_kb()
    return fig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sequential", type=int, default=100)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--comfyui", default="0.30.0", help="which ComfyUI tree under .runtime/ (0.30.0 or 0.3.75)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="zimage-soak-") as tmp:
        base = Path(tmp)
        write_tiny_models(base / "models")
        t0 = time.monotonic()
        with ComfyServer(args.comfyui, base) as server:
            print(f"ComfyUI {args.comfyui} on {server.url}, pid {server.proc.pid}, started in "
                  f"{time.monotonic() - t0:.1f} s, RSS {server.rss_kb() / 1024:.0f} MB", flush=True)
            load = run_concurrent(server, args.prompts, args.clients, args.size, args.steps)
            print(f"load: {args.prompts} prompts from {args.clients} clients at {args.size}x{args.size}, "
                  f"{args.steps} steps: submitted {load.submitted}, accepted {load.accepted}, completed "
                  f"{load.completed}, failed {len(load.failed)}, lost {load.lost}, duplicates {load.duplicates}, "
                  f"distinct outputs {load.distinct_outputs}, /history complete {load.history_complete}, "
                  f"{load.seconds} s ({load.seconds / max(1, load.completed):.2f} s/prompt)", flush=True)
            for f in load.failed[:10]:
                print("  failed:", f)
            mem = run_sequential(server, args.sequential, args.size, args.steps)
            print(f"sequential: {mem.runs} runs, failed {mem.failed}, RSS before {mem.rss_before_kb / 1024:.1f} MB, "
                  f"start (after warm-up) {mem.rss_start_kb / 1024:.1f} MB, end {mem.rss_end_kb / 1024:.1f} MB, "
                  f"growth {mem.growth_mb:+.1f} MB (bound {args.max_growth_mb} MB), {mem.seconds} s", flush=True)
            alive = server.alive()
        print(f"server alive at the end: {alive}")
    ok = load.ok() and mem.failed == 0 and mem.growth_mb < args.max_growth_mb and alive
    print("SOAK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
