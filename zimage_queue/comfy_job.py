"""One job on the worker's own ComfyUI (loopback only): the job's id decides the prompt id and the file names.

A job given out a second time (its first worker died) finds its prompt in this ComfyUI's /queue or /history when
the same worker takes it again, and is followed there instead of run again; on another worker it runs, and its
images get the same names, so the results folder never holds two sets.
"""
from __future__ import annotations

import base64
import ipaddress
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from zimage_batch.batch import execution_error, run_seconds
from zimage_batch.client import ComfyClient, PromptRejected
from zimage_batch.jobs import Job
from zimage_batch.workflow import Template

NAMESPACE = uuid.UUID("5f0c6b7e-2a8e-4d7b-9a51-3c1f0e6d2b90")   # job id -> prompt id, the same everywhere
POLL = 0.05          # seconds between looks at /history while a job runs (loopback: cheap)
LOOK_AROUND = 2.0    # seconds between checks that the prompt is still queued or running
GRACE = 30.0         # after interrupting a job over its timeout, how long to wait for it to stop
COUNTER = re.compile(r"^(.*?)_\d{5,}_?$")                         # SaveImage's "<prefix>_00001_"


class NotLoopback(ValueError):
    pass


def prompt_id_for(job_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, job_id))


def loopback_url(url: str) -> str:
    """The ComfyUI address, refused unless it is on this machine's loopback (ComfyUI has no authentication)."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise NotLoopback(f"--comfyui {url}: the worker talks to ComfyUI on loopback only (127.0.0.1 or [::1]); "
                          f"ComfyUI has no authentication, so start it with --listen 127.0.0.1 on this machine")
    return url


@dataclass
class Outcome:
    status: str                                   # "ok" or "failed"
    prompt_id: str
    error: str | None = None
    seconds: float | None = None
    reported: dict = field(default_factory=dict)  # what the pack's sampler says it used
    images: list[tuple[str, Path]] = field(default_factory=list)   # (result name, downloaded file)
    submissions: int = 0


class LocalComfy:
    def __init__(self, url: str, retries: int = 10):
        self.url = loopback_url(url)
        self.client = ComfyClient(self.url, retries=retries)

    def wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.get_json("/system_stats")
                return
            except Exception as e:                       # not up yet: refused, reset, 502 ...
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI at {self.url} did not answer within {timeout:g} s ({e})") from e
                time.sleep(0.25)

    def system_stats(self) -> dict:
        return self.client.get_json("/system_stats")

    def run(self, workflow: dict, job_id: str, timeout: float, sampler: str | None, scratch: Path) -> Outcome:
        prompt_id = prompt_id_for(job_id)
        outcome = Outcome("failed", prompt_id)
        if self.client.locate(prompt_id) is None:        # not queued, running or finished here before
            if not self.submit(workflow, prompt_id, outcome):
                return outcome
        started, looked = time.monotonic(), time.monotonic()
        interrupted = None
        while True:
            entry = self.client.history(prompt_id)
            if entry is not None:
                break
            now = time.monotonic()
            if interrupted is None and now - started > timeout:
                self.client.cancel([prompt_id])
                interrupted = now
            elif interrupted is not None and now - interrupted > GRACE:
                outcome.error = f"timed out after {timeout:g} s and did not stop when interrupted"
                return outcome
            if now - looked > LOOK_AROUND:
                looked = now
                if self.client.locate(prompt_id) is None:  # ComfyUI restarted and forgot it: send it again
                    if not self.submit(workflow, prompt_id, outcome):
                        return outcome
            time.sleep(POLL)
        status = entry.get("status") or {}
        messages = status.get("messages") or []
        outcome.seconds = run_seconds(messages)
        outcome.reported = reported(entry, sampler)
        if status.get("status_str") != "success":
            error = execution_error(messages)
            outcome.error = f"timed out after {timeout:g} s ({error})" if interrupted else error
            return outcome
        images = [image for output in (entry.get("outputs") or {}).values() for image in output.get("images") or []
                  if image.get("type", "output") == "output"]
        for index, image in enumerate(images, 1):
            dest = scratch / f"{index:03d}.png"
            self.client.download(image, dest)
            outcome.images.append((result_name(image, job_id, index), dest))
        if not images:
            outcome.error = "the workflow finished but saved no image"
            return outcome
        outcome.status = "ok"
        return outcome

    def submit(self, workflow: dict, prompt_id: str, outcome: Outcome) -> bool:
        outcome.submissions += 1
        try:
            self.client.submit(workflow, prompt_id)
            return True
        except PromptRejected as e:
            outcome.error = f"/prompt refused it: {e}"
            return False

    def warm_up(self, workflow_path: Path, timeout: float = 600) -> dict:
        """Run the workflow once at its smallest (64x64, 1 step, previews instead of saved files), so the models
        are loaded before the first job. Returns what it learned for the health report."""
        template = Template.load(workflow_path)
        workflow, _ = template.apply(Job("warm-up", 0, "warm-up", width=64, height=64, steps=1))
        for saver in template.savers:
            workflow[saver] = {"class_type": "PreviewImage", "inputs": {"images": workflow[saver]["inputs"]["images"]}}
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="zimage-warmup-") as scratch:
            outcome = self.run(workflow, f"warm-up-{uuid.uuid4()}", timeout, template.sampler, Path(scratch))
        if outcome.error and outcome.error != "the workflow finished but saved no image":
            raise RuntimeError(f"the warm-up prompt failed on {self.url}: {outcome.error}")
        models = sorted({str(v) for n in template.workflow.values() for k, v in n["inputs"].items()
                         if k.endswith(("ckpt_name", "unet_name", "clip_name", "vae_name"))})
        return {"model_loaded": True, "models": models, "warmup_seconds": round(time.monotonic() - started, 3)}


def reported(entry: dict, sampler: str | None) -> dict:
    ui = (entry.get("outputs") or {}).get(sampler or "") or {}
    info = (ui.get("zimage") or [{}])[0]
    return {k: info[k] for k in ("seed", "steps", "cfg", "width", "height") if isinstance(info, dict) and k in info}


def result_name(image: dict, job_id: str, index: int) -> str:
    """subfolder/<prefix>_<job id>_<n>.png: decided by the job, not by a server's file counter."""
    parts = [p for p in PurePosixPath(str(image.get("subfolder") or "").replace("\\", "/")).parts
             if p not in ("/", ".", "..")]
    name = Path(str(image["filename"]).replace("\\", "/"))
    match = COUNTER.match(name.stem)
    base = match.group(1) if match else name.stem
    return "/".join([*parts, f"{base}_{job_id}_{index:02d}{name.suffix or '.png'}"])


def safe_relative(text: str, what: str) -> PurePosixPath:
    """A relative path that stays inside its root (no '..', not absolute)."""
    path = PurePosixPath(str(text).replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{what} {text!r} must be a relative path without '..'")
    return path


def store_in_folder(outcome: Outcome, root: Path, run: str) -> list[str]:
    """Each image into root/run/name, atomically (a rerun replaces the same names with the same images)."""
    folder = root / safe_relative(run, "the run folder")
    stored = []
    for name, source in outcome.images:
        dest = folder / safe_relative(name, "the image name")
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        partial.write_bytes(source.read_bytes())
        os.replace(partial, dest)
        stored.append(name)
    return stored


def inline(outcome: Outcome) -> list[dict]:
    """The images carried in the result itself (small runs without a shared folder)."""
    return [{"name": name, "png": base64.b64encode(source.read_bytes()).decode("ascii")}
            for name, source in outcome.images]
