"""The Celery app the client, the workers and the operator's tools share: one queue, Redis as broker and
result backend, one job at a time per worker, acknowledged only when done.

Redelivery: a worker takes a job, Redis keeps it in its 'unacked' set until the worker acknowledges it after
the job ended. A worker that dies (SIGKILL, power, network) never acknowledges; once the job has been out
for `visibility_timeout` seconds, the next worker's sweep (every `restore_interval` s) puts it back at the head
of the queue. The visibility timeout must therefore exceed the longest job, or a job still running is given out
twice (harmless for the files, which a job's id names, but twice the work).

The sweep is kombu's QoS.restore_visible, under a lock (the 'unacked_mutex' key, SET NX PX) so that workers
take turns. A worker killed in the middle of its sweep, or a sweep whose SET reply a broker restart cut off,
leaves that lock behind, and no worker sweeps until it expires: hence a short expiry (SWEEP_LOCK_EXPIRE) and a
bounded sweep (SWEEP_LIMIT jobs, well within it; the restore is a WATCH transaction, so a sweep that did outlast
the lock would still put each job back once). A dead worker's job is given out again within
visibility_timeout + restore_interval, or + SWEEP_LOCK_EXPIRE more when such a lock was left just before.
"""
from __future__ import annotations

from celery import Celery
from celery.backends.redis import RedisBackend

from .broker import Broker

QUEUE = "zimage"
TASK = "zimage.generate"
VISIBILITY_TIMEOUT = 900.0      # seconds a taken job may stay unacknowledged before it is given out again
RESTORE_INTERVAL = 5.0          # seconds between a worker's sweeps for such jobs
SWEEP_LOCK_EXPIRE = 10          # seconds a sweep's lock outlives a worker that died holding it (kombu: 300)
SWEEP_LIMIT = 100               # lost jobs put back per sweep, so that a sweep ends well within its lock
RESULT_EXPIRES = 24 * 3600      # an uncollected result is dropped after a day


def make_app(broker: Broker, visibility_timeout: float = VISIBILITY_TIMEOUT,
             restore_interval: float = RESTORE_INTERVAL, takes_jobs: bool = True) -> Celery:
    """takes_jobs=False for the operator's tools (celery inspect, Flower): they only read replies and events,
    consumed without acknowledgement, so they go without kombu's ack emulation. With it, every consumer's poll
    runs kombu's sweep for lost jobs (QoS.restore_visible: SET unacked_mutex, then moving jobs back onto the
    queue), writes the ops user may not make: Redis refused them and `celery inspect` exited 69 after printing
    the answers."""
    backend = f"{__name__}:PolledResults+{broker.url}"
    app = Celery("zimage", broker=broker.url, backend=backend, set_as_current=False)
    transport = {"visibility_timeout": visibility_timeout, "unacked_restore_interval": restore_interval,
                 "unacked_restore_throttle": 1,     # every call sweeps (kombu: every 10th)
                 "unacked_mutex_expire": SWEEP_LOCK_EXPIRE, "unacked_restore_limit": SWEEP_LIMIT,
                 "socket_connect_timeout": 10, "socket_timeout": 30,
                 "health_check_interval": 10}
    if not takes_jobs:
        transport["ack_emulation"] = False        # kombu's plain QoS: restore_visible does nothing
    app.conf.update(
        task_default_queue=QUEUE, task_default_exchange=QUEUE, task_default_routing_key=QUEUE,
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True,                    # acknowledged after the job, so a lost worker's job comes back
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,           # one job at a time: the next waits in the queue for any worker
        worker_concurrency=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options=transport,
        result_backend_transport_options={"socket_connect_timeout": 10, "socket_timeout": 30,
                                          "health_check_interval": 10},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,     # a broker restart is waited out, not fatal
        result_backend_always_retry=True,       # a result stored while Redis restarts is stored when it is back
        result_backend_max_retries=120,
        result_expires=RESULT_EXPIRES,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5,
                                   "interval_max": 3},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_use_ssl=dict(broker.tls) if broker.tls else None,
        redis_backend_use_ssl=dict(broker.tls) if broker.tls else None,
    )
    return app


class PolledResults(RedisBackend):
    """Redis results, read by polling (zimage_queue.submit reads many at once with MGET) rather than by a
    subscription per job: nothing to re-subscribe after a broker restart, and clients need no pub/sub rights."""

    def on_task_call(self, producer, task_id):
        pass

    def forget(self, task_id):
        self._forget(task_id)
