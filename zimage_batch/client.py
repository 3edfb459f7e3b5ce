"""ComfyUI's HTTP and WebSocket API as the batch needs it, with reconnection that never sends a job twice.

The client picks each prompt_id itself. When a POST /prompt is cut off, the answer is lost but the job may
already be queued, so before posting again the client looks for that id in /queue and then /history.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import requests
import websocket

HTTP_TIMEOUT = 30          # seconds for one HTTP exchange; a job's own run time is watched separately
CANCEL_TIMEOUT = 5         # seconds for each cancelling call after a Ctrl-C
GATEWAY = (502, 503, 504)  # a proxy in front of ComfyUI answering while ComfyUI itself is down or restarting
# a lost or refused connection, nothing else: an HTTP error answer is a real answer and is never retried
LOST = (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError,
        websocket.WebSocketConnectionClosedException, websocket.WebSocketBadStatusException)


class ServerUnreachable(RuntimeError):
    pass


class PromptRejected(RuntimeError):
    """/prompt refused the workflow (HTTP 400 or another answer that is not a gateway's): the message is
    ComfyUI's own, node by node."""

    def __init__(self, status: int, body):
        self.status, self.body = status, body
        super().__init__(describe_rejection(status, body))


def describe_rejection(status: int, body) -> str:
    if not isinstance(body, dict):
        return f"HTTP {status}: {str(body)[:500]}"
    error = body.get("error") or {}
    if isinstance(error, str):
        error = {"message": error}
    head = ": ".join(s for s in (error.get("message"), error.get("details")) if s) or f"HTTP {status}"
    lines = [head]
    for node_id, node in (body.get("node_errors") or {}).items():
        for e in node.get("errors", []):
            what = ": ".join(s for s in (e.get("details"), e.get("message")) if s)
            lines.append(f"{node.get('class_type', '?')} #{node_id}: {what}")
    return "; ".join(lines)


class Backoff:
    """Waits 0.5, 1, 2, 4 ... (at most 10) seconds between tries; gives up after `retries` tries in a row."""

    def __init__(self, retries: int, first: float = 0.5, cap: float = 10.0):
        self.retries, self.first, self.cap = retries, first, cap

    def delays(self):
        for attempt in range(self.retries):
            yield min(self.cap, self.first * 2 ** attempt)


class ComfyClient:
    def __init__(self, server: str, retries: int = 10, on_retry=None):
        parts = urlsplit(server if "://" in server else f"http://{server}")
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        ws_scheme = "wss" if parts.scheme == "https" else "ws"
        self.client_id = str(uuid.uuid4())
        self.ws_url = f"{ws_scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws?clientId={self.client_id}"
        self.backoff = Backoff(retries)
        self.on_retry = on_retry or (lambda message: None)
        self.session = requests.Session()
        self.ws: websocket.WebSocket | None = None

    # ---- plain HTTP ----

    def get_json(self, path: str, **params):
        r = self.session.get(self.base + path, params=params or None, timeout=HTTP_TIMEOUT)
        gateway_check(r)
        r.raise_for_status()
        return r.json()

    def retrying(self, why: str, call):
        """call(), again after 0.5, 1, 2 ... s while the connection is lost; ServerUnreachable when it stays lost."""
        delays = self.backoff.delays()
        while True:
            try:
                return call()
            except LOST as e:
                delay = next(delays, None)
                if delay is None:
                    raise ServerUnreachable(f"{self.base}: {why} failed {self.backoff.retries} times "
                                            f"(last: {short(e)})") from e
                self.on_retry(f"{why}: {short(e)}; retrying in {delay:g} s")
                time.sleep(delay)

    def locate(self, prompt_id: str):
        """'running', 'pending', the /history entry, or None when the server has never heard of it.

        /queue is read before /history: a job moves from the queue to the history in one step on the server,
        so in this order a job cannot slip between the two looks and seem lost (and be sent a second time)."""
        queue = self.retrying("reading /queue", lambda: self.get_json("/queue"))
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(len(item) > 1 and item[1] == prompt_id for item in queue.get(key, [])):
                return state
        return self.history(prompt_id)

    def history(self, prompt_id: str) -> dict | None:
        entry = self.retrying("reading /history", lambda: self.get_json(f"/history/{prompt_id}"))
        return entry.get(prompt_id)

    def submit(self, workflow: dict, prompt_id: str) -> None:
        """Queue the workflow under our own prompt_id, exactly once, however often the connection drops."""
        body = {"prompt": workflow, "client_id": self.client_id, "prompt_id": prompt_id}
        state = {"first": True}

        def post():
            # a retry after a cut-off POST: the request may have reached the queue before the connection
            # broke, so look for it before posting again
            if not state["first"] and self.locate(prompt_id) is not None:
                return None
            state["first"] = False
            return gateway_check(self.session.post(self.base + "/prompt", json=body, timeout=HTTP_TIMEOUT))

        r = self.retrying("POST /prompt", post)
        if r is None or r.status_code == 200:
            return
        try:
            answer = r.json()
        except ValueError:
            answer = r.text
        raise PromptRejected(r.status_code, answer)

    def cancel(self, prompt_ids: list[str], patient: bool = True) -> None:
        """Drop these prompts from the queue, then stop the one running. In this order, so the server cannot
        start a waiting one in between. Not patient (on Ctrl-C): one short try each, the user wants the command
        back within seconds even from a server that has stopped answering."""
        timeout = HTTP_TIMEOUT if patient else CANCEL_TIMEOUT
        calls = [lambda: self.session.post(self.base + "/queue", json={"delete": prompt_ids}, timeout=timeout)]
        calls += [lambda prompt_id=prompt_id: self.session.post(
            self.base + "/interrupt", json={"prompt_id": prompt_id}, timeout=timeout) for prompt_id in prompt_ids]
        for call in calls:
            if patient:
                self.retrying("cancelling prompts", call)
            else:
                try:
                    call()
                except LOST:
                    pass

    def download(self, image: dict, dest: Path) -> None:
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}

        def fetch():
            with self.session.get(self.base + "/view", params=params, stream=True, timeout=HTTP_TIMEOUT) as r:
                gateway_check(r)
                r.raise_for_status()
                partial = dest.with_name(dest.name + ".part")     # a cut-off download never looks finished
                with open(partial, "wb") as f:
                    for chunk in r.iter_content(1 << 16):
                        f.write(chunk)
                partial.replace(dest)

        self.retrying(f"GET /view {image['filename']}", fetch)

    # ---- WebSocket ----

    def connect(self, wait: float) -> None:
        """Open the socket, retrying with backoff; recv() then waits at most `wait` seconds."""
        self.close()

        def open_socket():
            self.ws = websocket.create_connection(self.ws_url, timeout=HTTP_TIMEOUT)
            self.ws.settimeout(wait)

        self.retrying("connecting the WebSocket", open_socket)

    def receive(self) -> dict | None:
        """The next JSON message; None when nothing came within the wait. Binary frames (previews) are skipped.
        A lost connection raises one of LOST."""
        try:
            frame = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        if not frame and not self.ws.connected:         # the server's close frame
            raise websocket.WebSocketConnectionClosedException("the server closed the WebSocket")
        if isinstance(frame, bytes) or not frame:
            return None
        try:
            message = json.loads(frame)
        except json.JSONDecodeError:
            return None
        return message if isinstance(message, dict) else None

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except LOST:
                pass
            self.ws = None


def gateway_check(response: requests.Response) -> requests.Response:
    """A gateway error counts as a lost connection (retried, and /prompt looked up first), not as an answer."""
    if response.status_code in GATEWAY:
        raise requests.ConnectionError(f"HTTP {response.status_code} from {response.url}")
    return response


def short(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) < 160 else text[:157] + "..."
