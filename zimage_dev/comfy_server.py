"""Drive a real ComfyUI server as a user's client does: start it on 127.0.0.1 with this pack in custom_nodes/,
post API workflows to /prompt, follow them through /history. Used by the demo and by the server tests.

Only the standard library; every wait is bounded.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from zimage_dev import REPO, RUNTIME

PACK_NAME = "comfyui_zimage_turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, version: str, base: Path, runtime: Path = RUNTIME, extra_args: list[str] | None = None):
        self.tree = runtime / f"ComfyUI-{version}"
        self.python = runtime / "venv" / "bin" / "python"
        self.version, self.base = version, Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.extra_args = list(extra_args or [])     # e.g. --front-end-root, to serve another frontend

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    def start(self, timeout: float = 120) -> "ComfyServer":
        if not (self.tree / "main.py").is_file():
            raise FileNotFoundError(f"no ComfyUI at {self.tree}: run scripts/setup_runtime.sh")
        nodes = self.base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        if not (nodes / PACK_NAME).exists():
            (nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        self.log_path = self.base / "server.log"
        cmd = [str(self.python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
               *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.tree, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI {self.version} exited at start:\n{self.log_tail()}")
            try:
                self.get("/object_info")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI {self.version} did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ---- HTTP ----

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                text = r.read()
                return r.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def object_info(self) -> dict:
        return self.get("/object_info")

    def post_prompt(self, workflow: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": workflow, "client_id": str(uuid.uuid4())})

    def interrupt(self) -> None:
        self.post("/interrupt")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, workflow: dict, timeout: float = 300) -> dict:
        """Post and wait; raise AssertionError with ComfyUI's own error text unless it succeeded."""
        status, body = self.post_prompt(workflow)
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt failed: {execution_error(entry)}")
        return entry

    def output_files(self, entry: dict) -> list[Path]:
        return [self.output / img.get("subfolder", "") / img["filename"]
                for node in entry["outputs"].values() for img in node.get("images", [])]


def execution_error(entry: dict) -> str:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return f"{data['node_type']}: {data['exception_message']}"
    return entry["status"]["status_str"]


def write_tiny_models(models: Path) -> None:
    """Tiny random weights in the released layouts, where ComfyUI looks for them."""
    from zimage_dev import synthetic
    synthetic.write_split_files(models)
    synthetic.write_all_in_one(models / "checkpoints" / "z-image-turbo.safetensors", synthetic.dit_weights(),
                               synthetic.text_encoder_weights(), synthetic.vae_weights())


def load_workflow(name: str) -> dict:
    return json.loads((REPO / "workflows" / name).read_text(encoding="utf-8"))


def rss_kb(pid: int) -> int:
    """Resident memory of a process in KiB, from /proc/<pid>/status (VmRSS); Linux only."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")


def _server_rss_kb(self: ComfyServer) -> int:
    """The server process's resident memory in KiB (soak and leak tests watch it)."""
    if not self.alive():
        raise RuntimeError(f"ComfyUI {self.version} is not running:\n{self.log_tail()}")
    return rss_kb(self.proc.pid)


ComfyServer.rss_kb = _server_rss_kb
