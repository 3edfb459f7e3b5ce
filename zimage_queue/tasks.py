"""The task a worker runs for each job, and the worker's health as `celery inspect zimage_health` answers it.

The job (built by zimage_queue.submit): {"job_id", "workflow", "sampler", "timeout", "place"}, where place is
{"kind": "folder", "run": "<folder under the shared folder>"} or {"kind": "backend"} (images in the result).
The result: {"status", "error", "prompt_id", "worker", "redelivered", "reused", "seconds", "reported",
"files" (folder) or "images" (backend)}. A job that failed in ComfyUI is a result too (status "failed", with
ComfyUI's own error), never an exception: it is done, and must not come back.
"""
from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from celery.exceptions import Reject
from celery.worker.control import inspect_command

from zimage_batch.client import ServerUnreachable

from .app import TASK
from .comfy_job import LocalComfy, inline, store_in_folder


@dataclass
class WorkerState:
    comfy: LocalComfy | None = None
    shared_dir: Path | None = None
    name: str = ""
    warmup: dict = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    redelivered: int = 0
    current: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def health(self) -> dict:
        report = {"worker": self.name, "comfyui": self.comfy.url if self.comfy else None, "reachable": False,
                  "model_loaded": bool(self.warmup.get("model_loaded")), **self.warmup,
                  "jobs_done": self.done, "jobs_failed": self.failed, "jobs_redelivered": self.redelivered,
                  "current_job": self.current, "shared_dir": str(self.shared_dir) if self.shared_dir else None}
        try:
            stats = self.comfy.system_stats()
            report["reachable"] = True
            report["devices"] = [{k: d.get(k) for k in ("name", "type", "vram_total", "vram_free")}
                                 for d in stats.get("devices", [])]
        except Exception as e:                      # the report says what is wrong instead of failing
            report["error"] = str(e)[:300]
        return report


STATE = WorkerState()


@inspect_command()
def zimage_health(state):
    """ComfyUI reachable, model loaded (the warm-up ran), GPU memory, jobs done: for `celery inspect`."""
    return STATE.health()


def register(app: Celery) -> None:
    @app.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
    def generate(self, job: dict) -> dict:
        return run(self, job)


def run(task, job: dict) -> dict:
    redelivered = bool((task.request.delivery_info or {}).get("redelivered"))
    base = {"worker": STATE.name, "redelivered": redelivered, "reused": False}
    if redelivered:
        STATE.redelivered += 1
    earlier = task.backend.get_task_meta(task.request.id)
    if earlier.get("status") == "SUCCESS" and still_there(earlier.get("result"), job):
        # an earlier delivery finished and stored this, then its worker died before acknowledging
        return dict(earlier["result"], **base, reused=True)
    place = job.get("place") or {"kind": "backend"}
    if place.get("kind") == "folder" and STATE.shared_dir is None:
        return dict(base, status="failed", prompt_id=None, error=(
            f"worker {STATE.name} has no shared folder: start it with --shared-dir (the folder the client names "
            f"with --shared-dir, mounted here), or run the client without --shared-dir"))
    STATE.current = job["job_id"]
    try:
        with tempfile.TemporaryDirectory(prefix="zimage-job-") as scratch:
            try:
                outcome = STATE.comfy.run(job["workflow"], job["job_id"], float(job.get("timeout") or 600),
                                          job.get("sampler"), Path(scratch))
            except ServerUnreachable as e:
                # this worker's ComfyUI is gone: hand the job back to the queue and stop taking jobs
                stop_soon()
                raise Reject(f"ComfyUI unreachable: {e}", requeue=True) from e
            result = dict(base, status=outcome.status, error=outcome.error, prompt_id=outcome.prompt_id,
                          seconds=outcome.seconds, reported=outcome.reported, submissions=outcome.submissions)
            if outcome.status == "ok":
                if place.get("kind") == "folder":
                    result["files"] = store_in_folder(outcome, STATE.shared_dir, place.get("run", ""))
                else:
                    result["images"] = inline(outcome)
    finally:
        STATE.current = None
    with STATE.lock:
        if result["status"] == "ok":
            STATE.done += 1
        else:
            STATE.failed += 1
    return result


def still_there(result, job: dict) -> bool:
    if not isinstance(result, dict) or result.get("status") != "ok":
        return False
    place = job.get("place") or {}
    if place.get("kind") != "folder":
        return bool(result.get("images"))
    if STATE.shared_dir is None:
        return False
    folder = STATE.shared_dir / place.get("run", "")
    return bool(result.get("files")) and all((folder / name).is_file() for name in result["files"])


def stop_soon() -> None:
    """Warm shutdown of this worker once the current task returns (the service manager restarts it)."""
    import os
    import signal

    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
