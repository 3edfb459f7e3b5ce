"""zimage-batch --broker: the same jobs, workflow patching, log and --resume, sent to the queue instead of one
ComfyUI. Each job's id comes from what it runs (its workflow, its row, where its images go): the task id, the
prompt id on the worker and the image names all follow from it, so a job given out twice yields one set of images
and one log line.

Results: with --shared-dir, the workers write the images under the shared folder and the log lists them there;
without, the images travel in the result backend (fine for small runs) and the client writes them to --out.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from collections import deque
from pathlib import Path

from tqdm import tqdm

from zimage_batch.batch import log_job, pending_jobs, progress_bar
from zimage_batch.client import Backoff
from zimage_batch.jobs import Job
from zimage_batch.workflow import Template

from .app import QUEUE, TASK
from .broker import Broker, explain
from .comfy_job import prompt_id_for, safe_relative

POLL = 0.2            # seconds between looks at the results of the jobs still out
QUIET_NOTICE = 120.0  # after this long without a finished job, say so (no worker up?)


def job_id_for(workflow: dict, job: Job, place: dict) -> str:
    text = json.dumps({"workflow": workflow, "line": job.line, "place": place}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class QueueBatch:
    def __init__(self, app, broker: Broker, template: Template, jobs: list[Job], out_dir: Path, log_path: Path,
                 timeout: float = 600.0, retries: int = 10, progress: bool = True, skip: set[str] = frozenset(),
                 shared_dir: Path | None = None):
        self.app, self.broker, self.template, self.jobs = app, broker, template, jobs
        self.out_dir, self.log_path = Path(out_dir), Path(log_path)
        self.timeout, self.backoff, self.progress, self.skip = timeout, Backoff(retries), progress, skip
        self.shared_dir = Path(shared_dir).resolve() if shared_dir else None
        self.skipped = 0
        self.records: list[dict] = []
        self.out: dict[str, tuple[Job, dict, str]] = {}      # task id -> (job, values, job id)
        self.cancelled = False

    def place(self) -> dict:
        if self.shared_dir is None:
            return {"kind": "backend"}
        try:
            run = self.out_dir.resolve().relative_to(self.shared_dir)
        except ValueError:
            raise ValueError(f"--out {self.out_dir} must be inside --shared-dir {self.shared_dir}: the workers "
                             f"write the images there") from None
        return {"kind": "folder", "run": str(safe_relative(run.as_posix(), "--out"))}

    @property
    def where(self) -> str:
        return (f"shared folder {self.out_dir}" if self.shared_dir
                else f"result backend, written to {self.out_dir} by the client")

    def run(self) -> list[dict]:
        place = self.place()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        pending = pending_jobs(self)
        self.bar = progress_bar(pending, self.progress)
        try:
            with self.app.producer_or_acquire() as producer:
                while pending:
                    job, workflow, values = pending.popleft()
                    job_id = job_id_for(workflow, job, place)
                    task_id = f"zimage-{job_id}"
                    self.out[task_id] = (job, values, job_id)
                    payload = {"job_id": job_id, "workflow": workflow, "sampler": self.template.sampler,
                               "timeout": self.timeout, "place": place}
                    # straight onto the queue's list (no exchange lookup, no declaring): all a client may do
                    self.app.send_task(TASK, args=[payload], task_id=task_id, exchange="", routing_key=QUEUE,
                                       declare=[], producer=producer)
            self.say(f"{len(self.out)} jobs queued on {self.broker.shown}; results: {self.where}")
            self.follow()
        except KeyboardInterrupt:
            self.cancelled = True
            self.give_up(pending, "cancelled (Ctrl-C); jobs already queued still run, and --resume collects "
                                  "them without running them again")
        except self.app.connection().connection_errors + (OSError,) as e:
            why = f"the broker was lost: {explain(self.broker, e)}"
            self.say(why)
            self.give_up(pending, why)
        finally:
            self.bar.close()
        return self.records

    def follow(self) -> None:
        backend = self.app.backend
        last_done, delays = time.monotonic(), None
        while self.out:
            ids = list(self.out)
            try:
                values = backend.mget([backend.get_key_for_task(task_id) for task_id in ids])
                delays = None
            except backend.connection_errors as e:
                delays = delays or self.backoff.delays()
                delay = next(delays, None)
                if delay is None:
                    raise
                self.say(f"connection to the broker lost ({self.broker.redact(str(e))}); retrying in {delay:g} s")
                time.sleep(delay)
                continue
            for task_id, raw in zip(ids, values):
                if raw is None:
                    continue
                meta = backend.decode_result(raw)
                if meta["status"] not in ("SUCCESS", "FAILURE", "REVOKED"):
                    continue
                self.collect(task_id, meta)
                last_done = time.monotonic()
                try:
                    backend.forget(task_id)
                except backend.connection_errors:
                    pass                         # it expires on its own
            if time.monotonic() - last_done > QUIET_NOTICE:
                self.say(f"{len(self.out)} jobs still queued or running; none finished for {QUIET_NOTICE:g} s: "
                         f"are workers up? (celery -A zimage_queue.ops inspect zimage_health)")
                last_done = time.monotonic()
            time.sleep(POLL)

    def collect(self, task_id: str, meta: dict) -> None:
        job, values, job_id = self.out.pop(task_id)
        result = meta.get("result")
        if meta["status"] != "SUCCESS" or not isinstance(result, dict):
            self.record(job, values, prompt_id_for(job_id), "failed", f"the worker failed: {result!r}",
                        extra={"task_id": task_id})
            return
        files = []
        if result.get("status") == "ok":
            if "images" in result:
                files = [self.write(image) for image in result["images"]]
            else:
                files = [str(self.out_dir / name) for name in result.get("files") or []]
                missing = [f for f in files if not os.path.isfile(f)]
                if missing:
                    self.record(job, values, result.get("prompt_id"), "failed",
                                f"the worker wrote {missing[0]} but it is not there: is --shared-dir the same "
                                f"folder here and on worker {result.get('worker')}?", extra={"task_id": task_id})
                    return
        values = dict(values, **(result.get("reported") or {}))
        self.record(job, values, result.get("prompt_id"), result.get("status", "failed"), result.get("error"),
                    seconds=result.get("seconds"), files=files, submissions=result.get("submissions") or 0,
                    extra={"task_id": task_id, "worker": result.get("worker"),
                           "redelivered": bool(result.get("redelivered")), "reused": bool(result.get("reused")),
                           "results": self.where})

    def write(self, image: dict) -> str:
        dest = self.out_dir / safe_relative(image["name"], "the image name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        partial.write_bytes(base64.b64decode(image["png"]))
        partial.replace(dest)
        return str(dest)

    def give_up(self, pending: deque, why: str) -> None:
        for job, values, job_id in list(self.out.values()):
            self.record(job, values, prompt_id_for(job_id), "failed", why)
        for job, _, values in pending:
            self.record(job, values, None, "failed", f"not sent: {why}")
        self.out.clear()

    def record(self, job: Job, values: dict, prompt_id: str | None, status: str, error: str | None,
               seconds: float | None = None, files: list[str] | None = None, submissions: int = 0,
               extra: dict | None = None) -> None:
        self.records.append(log_job(self.log_path, job, values, prompt_id, status, error, seconds, files,
                                    submissions, extra))
        self.bar.update(job.count)
        if error:
            self.say(f"{job.where}: FAILED: {error}")

    def say(self, text: str) -> None:
        tqdm.write(self.broker.redact(text), file=sys.stderr)
