"""Drive a real, unmodified ComfyUI server the way a user's client does.

    server = ComfyServer().start("0.30.0", base_dir, fill_models=write_models)
    try:
        entry = server.run({"1": {...}, "2": {"class_type": "SaveImage", ...}})
        pngs = server.output_files(entry)
    finally:
        server.stop()

(or `with ComfyServer().start(...) as server:`). The server runs from the ComfyUI tree in .runtime/ with
`--base-directory <base_dir>`, so everything it reads and writes lives there:
    <base>/custom_nodes/comfyui_zimage_turbo -> this repository (a symlink; ComfyUI follows it)
    <base>/models/{diffusion_models,text_encoders,vae,checkpoints,diffusers}  (filled by the caller)
    <base>/output/  <base>/input/  <base>/temp/  <base>/user/
    <base>/server.log  (stdout and stderr of the server)
Both 0.30.0 and 0.3.75 derive the models folder as `<base>/models` in folder_paths.py.

Only the standard library: progress is followed by polling GET /history/<id> (websocket-client is not in the
runtime venv). Every wait is bounded; the server listens on 127.0.0.1 only.
"""
from __future__ import annotations

import atexit
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / ".runtime"
PACK_NAME = "comfyui_zimage_turbo"
MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae", "checkpoints", "diffusers")
HOST = "127.0.0.1"
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")     # 0.30.0 colours its log lines ("\x1b[32m[INFO]\x1b[0m ...")


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def execution_error(entry: dict) -> str | None:
    """ComfyUI's own error text from a history entry ("NodeType (node id): ExceptionType: message"), or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return None


class ComfyServer:
    """One ComfyUI server process. `start` launches it and returns once GET /object_info answers 200."""

    def __init__(self, runtime: Path = RUNTIME, pack: Path = REPO):
        self.runtime, self.pack = Path(runtime), Path(pack)
        self.python = self.runtime / "venv" / "bin" / "python"
        self.version: str | None = None
        self.base: Path | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None          # seconds from launch to the first /object_info 200

    # ---- paths ----

    @property
    def tree(self) -> Path:
        return self.runtime / f"ComfyUI-{self.version}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def models(self) -> Path:
        return self.base / "models"

    @property
    def output(self) -> Path:
        return self.base / "output"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    # ---- life cycle ----

    def start(self, version: str, base_dir: str | Path, fill_models: Callable[[Path], None] | None = None,
              timeout: float = 90) -> "ComfyServer":
        if self.proc is not None:
            raise RuntimeError("this ComfyServer is already started")
        self.version, self.base = version, Path(base_dir).resolve()
        if not (self.tree / "main.py").is_file() or not self.python.is_file():
            raise FileNotFoundError(f"no ComfyUI {version} runtime at {self.tree}: run scripts/setup_runtime.sh")
        nodes = self.base / "custom_nodes"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / PACK_NAME
        if not link.is_symlink() and not link.exists():
            link.symlink_to(self.pack, target_is_directory=True)
        for folder in MODEL_FOLDERS:
            (self.models / folder).mkdir(parents=True, exist_ok=True)
        if fill_models is not None:
            fill_models(self.models)
        # The free port is picked before ComfyUI binds it; if something takes it in between, try another.
        for attempt in range(3):
            self.port = free_port()
            if self._launch(timeout):
                return self
        raise RuntimeError(f"ComfyUI {version} could not bind a port after 3 tries:\n{self.log_tail()}")

    def _launch(self, timeout: float) -> bool:
        """Start main.py and wait for /object_info. False only when the port was taken under us."""
        cmd = [str(self.python), "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:        # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=self.tree, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        atexit.register(self.stop)                    # never leave a server behind if the caller forgets
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_text()
                self.proc = None
                if "address already in use" in log.lower() or "errno 98" in log.lower():
                    return False
                raise RuntimeError(f"ComfyUI {self.version} exited during start (see {self.log_path}):\n"
                                   f"{self.log_tail()}")
            try:
                status, _ = self._request("GET", "/object_info", timeout=10)
                if status == 200:
                    self.startup_s = time.monotonic() - t0
                    return True
            except OSError:                           # refused / reset / timeout while it is still booting
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"ComfyUI {self.version} did not answer /object_info within {timeout} s "
                           f"(see {self.log_path}):\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- log ----

    def log_text(self, raw: bool = False) -> str:
        """The server's stdout and stderr so far; colour codes removed unless `raw`."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return text if raw else ANSI_ESCAPE.sub("", text)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP ----

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:           # 4xx/5xx still carry ComfyUI's JSON body
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30):
        status, body = self._request("GET", path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path} answered {status}: {str(body)[:2000]}")
        return body

    def object_info(self) -> dict:
        return self.get("/object_info")

    def post_prompt(self, workflow: dict, client_id: str | None = None) -> tuple[int, dict]:
        """POST /prompt with an API-format workflow. 200: {"prompt_id", "number", "node_errors"};
        400: {"error": {...}, "node_errors": {node_id: {"errors": [...], ...}}}."""
        return self._request("POST", "/prompt", {"prompt": workflow, "client_id": client_id or uuid.uuid4().hex})

    def interrupt(self, prompt_id: str | None = None) -> int:
        """POST /interrupt (the running prompt, or only `prompt_id` if it is the one running). Returns the status."""
        status, _ = self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        return status

    def wait(self, prompt_id: str, timeout: float = 120, poll: float = 0.2) -> dict:
        """The /history entry of a finished prompt (success, error or interrupted), polled until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail(15)}")
            time.sleep(poll)

    def run(self, workflow: dict, timeout: float = 120) -> dict:
        """Post and wait. AssertionError with ComfyUI's own text when it is refused (400) or fails."""
        status, body = self.post_prompt(workflow)
        if status != 200:
            raise AssertionError(f"/prompt answered {status}: {json.dumps(body)[:3000]}")
        entry = self.wait(body["prompt_id"], timeout)
        if entry["status"]["status_str"] != "success":
            raise AssertionError(f"prompt {body['prompt_id']} failed: {execution_error(entry)}")
        return entry

    def output_files(self, entry: dict) -> list[Path]:
        """The files a history entry reports as saved to <base>/output (SaveImage and the like), in order."""
        return [self.output / item.get("subfolder", "") / item["filename"]
                for node in entry.get("outputs", {}).values() for item in node.get("images", [])
                if item.get("type", "output") == "output"]
