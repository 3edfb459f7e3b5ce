"""zimage-worker: a Celery worker beside one ComfyUI (on this machine's loopback), one job at a time.

Start: check the broker (password, TLS), wait for ComfyUI, run a warm-up prompt so the model is loaded, then
take jobs. SIGTERM (systemctl stop): the job in hand is finished and acknowledged, then the worker exits.
SIGKILL or a crash: the job in hand was never acknowledged and goes back to the queue after the visibility
timeout. Exit status 2 for a setting to fix (the message says which), 1 when ComfyUI never came up.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path

from .app import QUEUE, RESTORE_INTERVAL, SWEEP_LIMIT, VISIBILITY_TIMEOUT, make_app
from .broker import BrokerError, connect, load_broker
from .comfy_job import LocalComfy, NotLoopback
from .tasks import STATE, register

DEFAULT_WARMUP = Path(__file__).resolve().parents[1] / "workflows" / "ecommerce_turbo_api.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zimage-worker", description=(
        "Take Z-Image jobs from the queue and run them on the ComfyUI beside this worker. The broker's password "
        "comes from ZIMAGE_BROKER_PASSWORD_FILE or ZIMAGE_BROKER_PASSWORD, never from the command line."))
    p.add_argument("--broker", help="redis://USER@HOST:6379/0 or rediss://... (default: $ZIMAGE_BROKER)")
    p.add_argument("--comfyui", default="http://127.0.0.1:8188",
                   help="this machine's ComfyUI, on loopback only (default %(default)s)")
    p.add_argument("--shared-dir", type=Path,
                   help="the shared folder results are written to, when a client asks for it (--shared-dir there)")
    p.add_argument("--warmup-workflow", type=Path, default=DEFAULT_WARMUP,
                   help="the workflow run once at 64x64, 1 step, before taking jobs (default: the pack's "
                        "ecommerce_turbo_api.json)")
    p.add_argument("--no-warmup", action="store_true", help="take jobs at once, without the warm-up prompt")
    p.add_argument("--name", default=f"zimage@{socket.gethostname()}",
                   help="the worker's name in celery inspect and Flower (default %(default)s); one per GPU")
    p.add_argument("--visibility-timeout", type=float, default=VISIBILITY_TIMEOUT,
                   help="seconds before a job taken by a worker that died goes back to the queue; must exceed "
                        "the longest job (default %(default)s)")
    p.add_argument("--restore-interval", type=float, default=RESTORE_INTERVAL,
                   help="seconds between looks for such jobs (default %(default)s)")
    p.add_argument("--wait-comfyui", type=float, default=300,
                   help="seconds to wait for ComfyUI to answer at start (default %(default)s)")
    p.add_argument("--events", action="store_true", help="send task events (for Flower's task views)")
    p.add_argument("--tls-ca", help="CA file that signed the broker's certificate (or $ZIMAGE_TLS_CA)")
    p.add_argument("--tls-cert", help="client certificate, if the broker asks for one (or $ZIMAGE_TLS_CERT)")
    p.add_argument("--tls-key", help="its key (or $ZIMAGE_TLS_KEY)")
    p.add_argument("--loglevel", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    log = logging.getLogger("zimage-worker")
    try:
        broker = load_broker(args.broker, args.tls_ca, args.tls_cert, args.tls_key)
        connect(broker).close()
        comfy = LocalComfy(args.comfyui)
        if args.shared_dir is not None and not args.shared_dir.is_dir():
            raise BrokerError(f"--shared-dir {args.shared_dir}: no such folder (mount the shared folder first)")
    except (BrokerError, NotLoopback) as e:
        print(f"zimage-worker: {e}", file=sys.stderr)
        return 2
    log.info("broker %s: connected as %s", broker.shown, broker.user or "default")
    try:
        comfy.wait_until_up(args.wait_comfyui)
        warmup = {} if args.no_warmup else comfy.warm_up(args.warmup_workflow)
    except (TimeoutError, RuntimeError) as e:
        print(f"zimage-worker: {e}", file=sys.stderr)
        return 1
    STATE.comfy, STATE.shared_dir, STATE.name, STATE.warmup = comfy, args.shared_dir, args.name, warmup
    health = STATE.health()
    log.info("ComfyUI %s ready: model loaded %s (%s), warm-up %s s, devices %s", comfy.url, health["model_loaded"],
             ", ".join(health.get("models", [])), health.get("warmup_seconds"), health.get("devices"))
    app = make_app(broker, args.visibility_timeout, args.restore_interval)
    register(app)
    threading.Thread(target=sweep_lost_jobs, args=(app, args.restore_interval, broker.redact), name="zimage-sweep",
                     daemon=True).start()
    worker = app.Worker(hostname=args.name, pool="threads", concurrency=1, queues=[QUEUE],
                        loglevel=args.loglevel.upper(), without_gossip=True, without_mingle=True,
                        send_events=args.events, optimization="fair")
    worker.start()
    return worker.exitcode or 0


def sweep_lost_jobs(app, every: float, redact=str) -> None:
    """Every `every` seconds, kombu's own sweep (QoS.restore_visible): jobs taken longer than the visibility
    timeout ago and never acknowledged go back to the queue. Run here on a timer of our own so that it happens
    with every pool and across broker restarts; several workers sweeping take turns under kombu's mutex."""
    log = logging.getLogger("zimage-worker")
    connection, failing = None, False
    while True:
        time.sleep(every)
        try:
            if connection is None:
                connection = app.connection_for_read()
            connection.default_channel.qos.restore_visible(num=SWEEP_LIMIT, interval=1)
            if failing:
                log.info("sweep for lost jobs: working again")
            failing = False
        except Exception as e:                    # the broker is away: the next round reconnects
            # said once per streak: a sweep that keeps failing delays every dead worker's job
            (log.debug if failing else log.warning)("sweep for lost jobs failed (%s); retrying every %g s",
                                                     redact(str(e)), every)
            failing = True
            try:
                connection.release()
            except Exception:
                pass
            connection = None


if __name__ == "__main__":
    raise SystemExit(main())
