"""Running the jobs: keep a few queued on the server, follow them over the WebSocket, fetch the images, log.

The WebSocket is for speed and the progress bar; /queue and /history are the truth. Whenever the socket drops
or stays quiet, every job in flight is looked up there: finished ones are collected, and ones the server no
longer knows (it restarted, or its queue was cleared) are sent again under the same prompt_id.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .client import LOST, ComfyClient, PromptRejected, ServerUnreachable
from .jobs import Job, JobsError
from .workflow import Template, outside_limits

QUIET = 3.0          # seconds of WebSocket silence before the server is asked directly
GRACE = 60.0         # after interrupting a job that ran past its timeout, how long to wait for it to stop


@dataclass
class Flight:
    job: Job
    workflow: dict
    values: dict
    prompt_id: str
    started: float | None = None
    submissions: int = 1
    timed_out: bool = False


class Batch:
    def __init__(self, client: ComfyClient, template: Template, jobs: list[Job], out_dir: Path, log_path: Path,
                 timeout: float = 600.0, depth: int = 2, progress: bool = True, skip: set[str] = frozenset()):
        self.client, self.template, self.jobs = client, template, jobs
        self.out_dir, self.log_path = Path(out_dir), Path(log_path)
        self.timeout, self.depth = timeout, max(1, depth)
        self.progress, self.skip = progress, skip
        self.skipped = 0
        self.inflight: dict[str, Flight] = {}
        self.records: list[dict] = []
        self.cancelled = False
        client.on_retry = lambda message: self.say(f"connection lost: {message}")

    def run(self) -> list[dict]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        pending = pending_jobs(self)
        self.bar = progress_bar(pending, self.progress)
        try:
            # the socket opens first: messages for a prompt go only to sockets already open for this client_id
            self.client.connect(QUIET)
            self.check_limits(pending)
            while pending or self.inflight:
                while pending and len(self.inflight) < self.depth:
                    self.send(*pending.popleft())
                if self.inflight:
                    self.follow()
                    self.watch_timeouts()
        except ServerUnreachable as e:
            self.say(str(e))
            self.give_up(pending, str(e))
        except KeyboardInterrupt:
            # the user stops the batch: its prompts stop too, rather than run on the server unseen
            self.cancelled = True
            self.client.cancel(list(self.inflight), patient=False)
            self.give_up(pending, "cancelled (Ctrl-C)")
        finally:
            self.bar.close()
            self.client.close()
        return self.records

    def check_limits(self, pending: deque) -> None:
        """Every job against the server's own input limits; JobsError (nothing sent) naming each bad row."""
        classes = {self.template.workflow[n]["class_type"] for n in self.template.patched_nodes}
        info = {}
        for name in classes:
            info.update(self.client.retrying("reading /object_info",
                                             lambda name=name: self.client.get_json(f"/object_info/{name}")))
        problems = []
        for job, workflow, _ in pending:
            problems += [p for p in outside_limits(job, workflow, self.template.patched_nodes, info)
                         if p not in problems]
        if problems:
            raise JobsError(problems)

    def give_up(self, pending: deque, why: str) -> None:
        for flight in list(self.inflight.values()):
            self.record(flight.job, flight.values, flight.prompt_id, "failed", why)
        for job, _, values in pending:
            self.record(job, values, None, "failed", f"not sent: {why}")
        self.inflight.clear()

    # ---- sending and following ----

    def send(self, job: Job, workflow: dict, values: dict) -> None:
        prompt_id = str(uuid.uuid4())
        # in flight from before the POST: a Ctrl-C during it still cancels and logs the job
        self.inflight[prompt_id] = Flight(job, workflow, values, prompt_id)
        try:
            self.client.submit(workflow, prompt_id)
        except PromptRejected as e:
            del self.inflight[prompt_id]
            self.record(job, values, prompt_id, "failed", f"/prompt refused it: {e}")

    def follow(self) -> None:
        try:
            message = self.client.receive()
        except LOST as e:
            self.say(f"WebSocket lost ({type(e).__name__}); reconnecting")
            self.client.connect(QUIET)
            self.reconcile()
            return
        if message is None:
            self.reconcile()             # quiet: messages may have been missed, ask the server directly
        else:
            self.handle(message)

    def handle(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        flight = self.inflight.get(data.get("prompt_id")) if isinstance(data, dict) else None
        if flight is None:
            return                       # status updates, other clients' prompts, prompts already collected
        if kind in ("execution_start", "executing", "progress", "execution_cached") and flight.started is None:
            flight.started = time.monotonic()
        if kind == "progress":
            self.bar.set_postfix_str(f"{flight.job.where}: step {data.get('value')}/{data.get('max')}")
        elif kind == "executing" and data.get("node") is None:
            # sent after the server has written the history entry: the job is over, however it ended
            self.collect(flight.prompt_id)

    def reconcile(self) -> None:
        queue = self.client.retrying("reading /queue", lambda: self.client.get_json("/queue"))
        running = {item[1] for item in queue.get("queue_running", []) if len(item) > 1}
        waiting = {item[1] for item in queue.get("queue_pending", []) if len(item) > 1}
        for prompt_id, flight in list(self.inflight.items()):
            if prompt_id in running:
                flight.started = flight.started or time.monotonic()
            elif prompt_id not in waiting and not self.collect(prompt_id):
                # neither queued nor in the history, read in that order (see ComfyClient.locate): the server
                # lost it unfinished, so it is sent again under the same id; it cannot have run to the end
                flight.submissions += 1
                flight.started = None
                self.say(f"{flight.job.where}: the server no longer knows prompt {prompt_id}; sending it again")
                try:
                    self.client.submit(flight.workflow, prompt_id)
                except PromptRejected as e:
                    del self.inflight[prompt_id]
                    self.record(flight.job, flight.values, prompt_id, "failed", f"/prompt refused it: {e}")

    def watch_timeouts(self) -> None:
        now = time.monotonic()
        for flight in list(self.inflight.values()):
            if flight.started is None or now - flight.started <= self.timeout:
                continue
            if not flight.timed_out:
                flight.timed_out = True
                self.say(f"{flight.job.where}: running for more than {self.timeout:g} s; interrupting it")
                self.client.cancel([flight.prompt_id])
            elif now - flight.started > self.timeout + GRACE:
                del self.inflight[flight.prompt_id]          # it ignores the interrupt: stop waiting for it
                self.record(flight.job, flight.values, flight.prompt_id, "failed",
                            f"timed out after {self.timeout:g} s and did not stop when interrupted")

    # ---- collecting ----

    def collect(self, prompt_id: str) -> bool:
        """Fetch a finished job's images and log it; False when the history has no entry for it (yet)."""
        entry = self.client.history(prompt_id)
        if entry is None:
            return False
        flight = self.inflight[prompt_id]           # popped once logged: a Ctrl-C while downloading still logs it
        status = entry.get("status") or {}
        values = dict(flight.values, **self.reported(entry))
        seconds = run_seconds(status.get("messages") or [])
        if status.get("status_str") != "success":
            error = execution_error(status.get("messages") or [])
            if flight.timed_out:
                error = f"timed out after {self.timeout:g} s ({error})"
            self.record(flight.job, values, prompt_id, "failed", error, seconds=seconds,
                        submissions=flight.submissions)
            del self.inflight[prompt_id]
            return True
        files = []
        for output in (entry.get("outputs") or {}).values():
            for image in output.get("images") or []:
                if image.get("type", "output") == "output":  # previews (type temp) are not results
                    dest = self.place(image)
                    self.client.download(image, dest)
                    files.append(str(dest))
        status_word, error = ("ok", None) if files else ("failed", "the workflow finished but saved no image")
        self.record(flight.job, values, prompt_id, status_word, error, seconds=seconds, files=files,
                    submissions=flight.submissions)
        del self.inflight[prompt_id]
        return True

    def reported(self, entry: dict) -> dict:
        """The values the pack's sampler says it used (it reports them as ui output), over what was sent."""
        ui = (entry.get("outputs") or {}).get(self.template.sampler) or {}
        info = (ui.get("zimage") or [{}])[0]
        return {k: info[k] for k in ("seed", "steps", "cfg", "width", "height") if isinstance(info, dict) and k in info}

    def place(self, image: dict) -> Path:
        """out_dir/subfolder/filename as the server named it, never outside out_dir, never over an old file."""
        parts = [p for p in PurePosixPath(str(image.get("subfolder") or "").replace("\\", "/")).parts
                 if p not in ("/", ".", "..")]
        folder = self.out_dir.joinpath(*parts)
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(str(image["filename"]).replace("\\", "/")).name
        dest, n = folder / name, 1
        while dest.exists():
            dest, n = folder / f"{Path(name).stem}-{n}{Path(name).suffix}", n + 1
        return dest

    def record(self, job: Job, values: dict, prompt_id: str | None, status: str, error: str | None,
               seconds: float | None = None, files: list[str] | None = None, submissions: int = 0) -> None:
        self.records.append(log_job(self.log_path, job, values, prompt_id, status, error, seconds, files,
                                    submissions))
        self.bar.update(job.count)
        if error:
            self.say(f"{job.where}: FAILED: {error}")

    def say(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)


def log_job(log_path: Path, job: Job, values: dict, prompt_id: str | None, status: str, error: str | None,
            seconds: float | None, files: list[str] | None, submissions: int, extra: dict | None = None) -> dict:
    """The job's line in the run log (JSON Lines, a line per job, written as it ends, so a stopped run loses
    nothing and a rerun skips what is done); returns it."""
    line = {"job": job.where, "line": job.line, "prompt_id": prompt_id, "status": status, "error": error,
            **values, "seconds": seconds, "files": files or [], "submissions": submissions, **(extra or {})}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(json.dumps(line, ensure_ascii=False) + "\n")
    return line


def digest(workflow: dict) -> str:
    """What a job sent, in 16 hex digits: the same row on the same template gives the same digest."""
    text = json.dumps(workflow, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def pending_jobs(batch) -> deque:
    """(job, workflow, values) for each job of `batch` (jobs, template, skip, say) not done in an earlier run,
    counting and saying the ones skipped (`--resume`): the same for the direct and the queued client."""
    pending = deque()
    for job in batch.jobs:
        workflow, values = batch.template.apply(job)
        values["workflow_hash"] = digest(workflow)
        if values["workflow_hash"] in batch.skip:
            batch.skipped += 1
            batch.say(f"{job.where}: done in an earlier run (same workflow, files still there); skipped")
        else:
            pending.append((job, workflow, values))
    return pending


def progress_bar(pending, enabled: bool) -> tqdm:
    return tqdm(total=sum(job.count for job, _, _ in pending), unit="img", desc="zimage-batch",
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def done_in_log(path: Path) -> set[str]:
    """The workflow digests of jobs an earlier run finished, where every file it saved is still there."""
    done = set()
    if not path.is_file():
        return done
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue                     # a line cut short by a crash: that job is simply done again
        if (isinstance(line, dict) and line.get("status") == "ok" and line.get("workflow_hash") and line.get("files")
                and all(Path(f).is_file() for f in line["files"])):
            done.add(line["workflow_hash"])
    return done


def run_seconds(messages: list) -> float | None:
    """Server-side run time, from its own execution_start and end timestamps (milliseconds)."""
    stamps = {kind: data.get("timestamp") for kind, data in messages if isinstance(data, dict)}
    start = stamps.get("execution_start")
    end = next((stamps[k] for k in ("execution_success", "execution_error", "execution_interrupted")
                if stamps.get(k) is not None), None)
    return round((end - start) / 1000, 3) if start is not None and end is not None else None


def execution_error(messages: list) -> str:
    for kind, data in messages:
        if kind == "execution_error":
            return f"{data.get('node_type')} #{data.get('node_id')}: {str(data.get('exception_message')).strip()}"
        if kind == "execution_interrupted":
            return "interrupted on the server"
    return "the server reports the job did not succeed"
