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
    batch = Batch(ComfyClient(args.server, retries=args.retries), template, jobs, args.out, log,
                  timeout=args.timeout, depth=args.depth, progress=progress,
                  skip=done_in_log(log) if args.resume else set())
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
