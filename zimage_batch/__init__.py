"""zimage-batch: generate many images through a running ComfyUI's /prompt API from a CSV or JSONL of jobs.

A pure client (requests, websocket-client, tqdm): it never imports torch or ComfyUI, so it runs on any
machine that can reach the server.
"""
__version__ = "0.1.0"
