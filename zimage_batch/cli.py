"""zimage-batch: the command line. Exit status 0 when every job made its images, 1 when any job failed,
2 when the jobs file or the workflow is wrong (then nothing was sent), 130 when stopped with Ctrl-C."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .batch import Batch, done_in_log
from .client import ComfyClient
from .jobs import COLUMNS, JobsError, load_jobs
from .workflow import Template, WorkflowError

DEFAULT_WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "ecommerce_turbo_api.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zimage-batch",
        description="Generate images for every row of a CSV or JSONL jobs file through a running ComfyUI "
                    f"(/prompt API). Columns: {', '.join(COLUMNS)}; only prompt is required, a blank cell "
                    "keeps the workflow's value. count = images per job, made as one batch (one prompt).")
    p.add_argument("--jobs", required=True, type=Path, help="the jobs: .csv, or .jsonl (one JSON object a line)")
    p.add_argument("--workflow", type=Path, default=DEFAULT_WORKFLOW,
                   help="an API-format workflow to fill in (default: the pack's ecommerce_turbo_api.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("zimage_batch_out"),
                   help="where the images are saved (default %(default)s)")
    p.add_argument("--log", type=Path, help="the JSONL log, a line per job, appended (default OUT/log.jsonl)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds a job may run on the server before it is interrupted and failed (default %(default)s)")
    p.add_argument("--retries", type=int, default=10,
                   help="reconnection tries, 0.5 s to 10 s apart, before the server counts as gone "
                        "(default %(default)s)")
    p.add_argument("--queue-depth", "--concurrency", dest="depth", type=int, default=2,
                   help="jobs queued on the server at once; 2 keeps it busy while the last images download "
                        "(default %(default)s)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="the progress bar on stderr; auto: only on a terminal")
    p.add_argument("--resume", action="store_true",
                   help="skip jobs the log records as done whose images are still there (same row, same workflow)")
    p.add_argument("--check", action="store_true", help="only check the jobs against the workflow; send nothing")
    queue = p.add_argument_group("queue (many ComfyUIs behind Celery workers; needs the 'queue' extra)")
    queue.add_argument("--broker", nargs="?", const="", metavar="URL",
                       help="send the jobs to this Redis queue instead of --server: redis://USER@HOST:6379/0 or "
                            "rediss://... for TLS; alone, the URL in $ZIMAGE_BROKER. The password comes from "
                            "$ZIMAGE_BROKER_PASSWORD_FILE or $ZIMAGE_BROKER_PASSWORD, never the command line")
    queue.add_argument("--shared-dir", type=Path,
                       help="a folder the workers share with this machine: they write the images under it, and "
                            "--out must be inside it (default: images come back through the result backend)")
    queue.add_argument("--tls-ca", help="CA file that signed the broker's certificate (or $ZIMAGE_TLS_CA)")
    queue.add_argument("--tls-cert", help="client certificate, if the broker asks for one (or $ZIMAGE_TLS_CERT)")
    queue.add_argument("--tls-key", help="its key (or $ZIMAGE_TLS_KEY)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        template = Template.load(args.workflow)
        jobs = load_jobs(args.jobs)
        misfits = [problem for problem in map(template.check, jobs) if problem]
        if misfits:
            raise JobsError(misfits)
    except (JobsError, WorkflowError) as e:
        print(f"zimage-batch: nothing was sent; fix these first:\n{e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"zimage-batch: {len(jobs)} jobs, {sum(j.count for j in jobs)} images: all rows are valid")
        return 0
    log = args.log or args.out / "log.jsonl"
    progress = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    started = time.monotonic()
    skip = done_in_log(log) if args.resume else set()
    if args.broker is not None:
        batch = queue_batch(args, template, jobs, log, progress, skip)
        if batch is None:
            return 2
    else:
        batch = Batch(ComfyClient(args.server, retries=args.retries), template, jobs, args.out, log,
                      timeout=args.timeout, depth=args.depth, progress=progress, skip=skip)
    try:
        records = batch.run()
    except JobsError as e:                       # rows outside the server's own limits, found before sending
        print(f"zimage-batch: nothing was sent; fix these first:\n{e}", file=sys.stderr)
        return 2
    elapsed = time.monotonic() - started
    failed = [r for r in records if r["status"] != "ok"]
    images = sum(len(r["files"]) for r in records)
    rate = len(records) / elapsed * 60 if elapsed > 0 else 0.0
    skipped = f" ({batch.skipped} done before, skipped)" if batch.skipped else ""
    print(f"zimage-batch: {len(records)} jobs{skipped}, {len(records) - len(failed)} ok, {len(failed)} failed; "
          f"{images} images in {args.out}; log {log}; {elapsed:.1f} s ({rate:.1f} jobs/min)")
    for r in sorted(failed, key=lambda r: r["line"]):
        print(f"  FAILED {r['job']}: {r['error']}")
    if batch.cancelled:
        return 130                       # the shell's code for "stopped by Ctrl-C"
    return 1 if failed else 0


def queue_batch(args, template, jobs, log, progress, skip):
    """The queue mode's batch, after checking the broker accepts us; None (and the reason printed) if not."""
    try:
        from zimage_queue.app import make_app
        from zimage_queue.broker import BrokerError, connect, load_broker
        from zimage_queue.submit import QueueBatch
    except ImportError as e:
        print(f"zimage-batch: --broker needs Celery and redis ({e.name} is missing): pip install -e '.[queue]'",
              file=sys.stderr)
        return None
    try:
        broker = load_broker(args.broker or None, args.tls_ca, args.tls_cert, args.tls_key)
        connect(broker).close()
        batch = QueueBatch(make_app(broker), broker, template, jobs, args.out, log, timeout=args.timeout,
                           retries=args.retries, progress=progress, skip=skip, shared_dir=args.shared_dir)
        batch.place()
    except (BrokerError, ValueError) as e:
        print(f"zimage-batch: nothing was sent: {e}", file=sys.stderr)
        return None
    return batch
