"""Many ComfyUIs behind one queue, for real: Debian's redis-server on 127.0.0.1 with ACL users and passwords (TLS
for one test), two ComfyUI servers with the pack and tiny random weights, a zimage-worker beside each, and
zimage-batch --broker as a shop runs it.

What is checked is what happened, not what the client says: the PNGs in the shared folder (one set per job,
named by the job), the prompts each ComfyUI logged as executed, the unacknowledged job in Redis when a worker is
killed. The figures (throughput 1 vs 2 workers, redelivery time) are printed and written to
QUEUE_FIGURES (default .runtime/queue_figures.json).
"""
from __future__ import annotations

import csv
import json
import os
import secrets
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.redis_server import RedisServer, make_certificates, redis_available

celery = pytest.importorskip("celery", reason="the queue needs Celery: pip install -e '.[queue]'")
redis = pytest.importorskip("redis", reason="the queue needs redis-py: pip install -e '.[queue]'")
if redis_available():
    pytest.skip(redis_available(), allow_module_level=True)

# these import celery and redis: after the skips above
from zimage_queue.acl import acl_file  # noqa: E402
from zimage_queue.app import SWEEP_LOCK_EXPIRE, make_app  # noqa: E402
from zimage_queue.broker import load_broker  # noqa: E402
from zimage_queue.comfy_job import prompt_id_for  # noqa: E402

BIN = REPO / ".runtime" / "venv" / "bin"
BATCH, WORKER = str(BIN / "zimage-batch"), str(BIN / "zimage-worker")
COLUMNS = ["prompt", "negative", "seed", "width", "height", "count", "steps", "cfg", "filename_prefix"]
VISIBILITY = 12          # seconds a killed worker's job stays taken; every job here takes well under 1 s
RESTORE = 1              # seconds between a worker's sweeps for such jobs (--restore-interval)
# a killed worker's job runs again within VISIBILITY + RESTORE, plus this: the taking worker's next poll, the job,
# the client's poll of its result, a worker's reconnect after the Redis restart (docs/scale_out.md: the bound)
REDELIVERY_SLACK = 5
FIGURES = Path(os.environ.get("QUEUE_FIGURES", REPO / ".runtime" / "queue_figures.json"))


def record_figure(**values) -> None:
    figures = json.loads(FIGURES.read_text()) if FIGURES.is_file() else {}
    figures.update(values)
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2))
    print("queue figures:", json.dumps(values))


# ---- the cluster: Redis, two ComfyUIs, their workers ----

class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.passwords = {role: secrets.token_urlsafe(18) for role in ("client", "worker", "ops")}
        self.users = {"client": "zimage-client", "worker": "zimage-worker", "ops": "zimage-ops"}
        self.files = {}
        for role, password in self.passwords.items():
            path = base / f"{role}.password"
            path.write_text(password + "\n")
            path.chmod(0o600)
            self.files[role] = path
        self.admin = secrets.token_urlsafe(18)     # 'default', the administrator: reads the ACL LOG
        self.acl = acl_file([(role, self.users[role], self.passwords[role]) for role in self.passwords], self.admin)
        self.redis = RedisServer(base / "redis", self.acl)
        self.shared = base / "shared"
        self.shared.mkdir()
        self.servers: dict[str, ComfyServer] = {}
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_logs: dict[str, Path] = {}

    def url(self, role: str, redis_server: RedisServer | None = None, scheme: str = "redis") -> str:
        return f"{scheme}://{self.users[role]}@{(redis_server or self.redis).address}/0"

    def env(self, role: str, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
        env.update({"ZIMAGE_BROKER_PASSWORD_FILE": str(self.files[role]), **extra})
        return env

    def redis_as(self, role: str) -> "redis.Redis":
        if role == "admin":
            return redis.Redis(host="127.0.0.1", port=self.redis.port, username="default", password=self.admin,
                               socket_timeout=10)
        return redis.Redis(host="127.0.0.1", port=self.redis.port, username=self.users[role],
                           password=self.passwords[role], socket_timeout=10)

    def start_worker(self, name: str, server: ComfyServer, broker_url: str | None = None, *extra,
                     env: dict | None = None, wait: bool = True) -> subprocess.Popen:
        log = self.base / f"worker-{name}.log"
        cmd = [WORKER, "--broker", broker_url or self.url("worker"), "--comfyui", server.url, "--shared-dir",
               str(self.shared), "--name", f"{name}@test", "--visibility-timeout", str(VISIBILITY),
               "--restore-interval", str(RESTORE), *extra]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or self.env("worker"),
                                    cwd=REPO)
        self.workers[name], self.worker_logs[name] = proc, log
        if wait:
            self.wait_ready(name)
        return proc

    def ensure_worker(self, name: str) -> None:
        if name not in self.workers or self.workers[name].poll() is not None:
            self.start_worker(name, self.servers[name])

    def wait_ready(self, name: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        proc, log = self.workers[name], self.worker_logs[name]
        while f"{name}@test ready." not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker {name} did not start (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(0.1)

    def stop_workers(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.workers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def start_servers(base: Path, names: list[str]) -> dict[str, ComfyServer]:
    """Two ComfyUIs started side by side (each takes a while to import), each on one CPU thread: as one per GPU,
    they then do not fight over the same cores, and one worker against two measures the queue's scaling."""
    servers, errors = {}, []
    threads_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"             # read by each server at its start (a copy of this env)
    for name in names:
        root = base / f"comfy-{name}"
        write_tiny_models(root / "models")
        servers[name] = ComfyServer("0.30.0", root)

    def start(server):
        try:
            server.start(timeout=240)
        except Exception as e:              # reported below, after both tries
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if threads_before is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = threads_before
    if errors:
        for s in servers.values():
            s.stop()
        raise errors[0]
    return servers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    comfyui_tree("0.30.0")
    base = tmp_path_factory.mktemp("queue")
    c = Cluster(base)
    c.redis.start()
    try:
        c.servers = start_servers(base, ["a", "b"])
        c.start_worker("a", c.servers["a"])
        yield c
    finally:
        c.stop_workers()
        for server in c.servers.values():
            server.stop()
        c.redis.stop()


# ---- helpers ----

def write_jobs(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_rows(n: int, tag: str, seed0: int = 0) -> list[dict]:
    return [{"prompt": f"product {tag} {i}", "seed": seed0 + i, "width": 64, "height": 64, "steps": 2,
             "filename_prefix": f"{tag}/item"} for i in range(n)]


def batch_args(c: Cluster, jobs: Path, out: Path, *extra) -> list[str]:
    return [BATCH, "--broker", c.url("client"), "--jobs", str(jobs), "--out", str(out), "--shared-dir",
            str(c.shared), "--progress", "off", *map(str, extra)]


def run_batch(c: Cluster, jobs: Path, out: Path, *extra, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(batch_args(c, jobs, out, *extra), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=c.env("client"))


def read_log(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()),
                  key=lambda line: line["line"])


def executed(server: ComfyServer) -> int:
    return server.log_text().count("Prompt executed in")


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def check_once_each(lines: list[dict], out: Path, jobs: int) -> None:
    """Every job logged once and ok, its one PNG present and distinct from every other, nothing else there."""
    assert len(lines) == jobs and len({l["line"] for l in lines}) == jobs, "one log line per job"
    bad = [(l["job"], l["error"]) for l in lines if l["status"] != "ok"]
    assert not bad, bad
    files = [f for l in lines for f in l["files"]]
    assert len(files) == jobs and all(Path(f).is_file() for f in files)
    assert sorted(map(str, pngs(out))) == sorted(files), "the folder holds exactly the logged images, once each"
    assert len({Path(f).read_bytes() for f in files}) == jobs, "distinct seeds give distinct images"
    for line in lines:
        assert line["results"].startswith("shared folder")
        [name] = line["files"]
        assert line["task_id"].removeprefix("zimage-") in Path(name).name, "the job's id names its file"


# ---- the tests ----

def test_one_worker_then_two_share_the_queue_each_job_done_once(cluster, tmp_path):
    c = cluster
    a, b = c.servers["a"], c.servers["b"]
    # one worker: the baseline
    jobs1, out1 = write_jobs(tmp_path / "one.csv", tiny_rows(30, "solo")), c.shared / "solo"
    started = time.monotonic()
    result = run_batch(c, jobs1, out1)
    one = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    check_once_each(read_log(out1 / "log.jsonl"), out1, 30)

    c.ensure_worker("b")
    ran = executed(a) + executed(b)
    jobs2, out2 = write_jobs(tmp_path / "many.csv", tiny_rows(100, "many", seed0=1000)), c.shared / "many"
    started = time.monotonic()
    result = run_batch(c, jobs2, out2)
    two = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100 jobs, 100 ok, 0 failed; 100 images" in result.stdout
    lines = read_log(out2 / "log.jsonl")
    check_once_each(lines, out2, 100)
    by_worker = {w: sum(l["worker"] == w for l in lines) for w in ("a@test", "b@test")}
    assert all(by_worker.values()), f"both workers should take jobs: {by_worker}"
    deadline = time.monotonic() + 10
    while executed(a) + executed(b) < ran + 100 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert executed(a) + executed(b) - ran == 100, "each job ran on exactly one ComfyUI, once"
    redelivered = sum(l["redelivered"] for l in lines)
    record_figure(jobs=100, done=100, lost=0, duplicated=0, redelivered=redelivered, by_worker=by_worker,
                  one_worker_jobs_per_s=round(30 / one, 2), two_workers_jobs_per_s=round(100 / two, 2),
                  speedup_two_vs_one=round((100 / two) / (30 / one), 2))


def test_health_answers_for_each_worker(cluster):
    c = cluster
    c.ensure_worker("b")
    env = c.env("ops", ZIMAGE_BROKER=c.url("ops"))
    result = subprocess.run([str(BIN / "celery"), "-A", "zimage_queue.ops", "inspect", "zimage_health", "--json",
                             "--timeout", "10"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(answers) == {"a@test", "b@test"}, answers
    for name, health in answers.items():
        assert health["reachable"] and health["model_loaded"] and health["warmup_seconds"] > 0, health
        assert health["models"] == ["z-image-turbo.safetensors"] and health["devices"], health
        assert health["comfyui"].startswith("http://127.0.0.1:")
    assert c.passwords["ops"] not in result.stdout + result.stderr


def documented_ops_commands() -> list[str]:
    """docs/scale_out.md step 5's `celery … inspect` lines, as written (their comments included: bash drops them)."""
    doc = (REPO / "docs" / "scale_out.md").read_text(encoding="utf-8")
    block = doc[doc.index("### 5. Watch it"):]
    block = block[block.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    return [line for line in block.splitlines() if " inspect " in line]


def test_the_documented_inspections_exit_0_as_the_ops_user_which_writes_nothing_else(cluster):
    """Step 5 as written, run as zimage-ops (the cron check): the workers' answers, exit 0, every time; Redis
    refuses the ops user nothing on the way (its ACL LOG stays empty) and still refuses it every job write."""
    c = cluster
    c.ensure_worker("a")
    c.ensure_worker("b")
    commands = documented_ops_commands()
    assert [cmd.split("#")[0].split()[-1] for cmd in commands] == ["zimage_health", "active"], commands
    admin = c.redis_as("admin")
    admin.acl_log_reset()
    env = c.env("ops", ZIMAGE_BROKER=c.url("ops"), PATH=f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    for run in range(5):
        for command in commands:
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=REPO,
                                    env=env)
            said = result.stdout + result.stderr
            assert result.returncode == 0, f"run {run + 1}: {command}: exit {result.returncode}\n{said}"
            assert "a@test: OK" in result.stdout and "b@test: OK" in result.stdout, said
            assert "2 nodes online." in result.stdout, said
            if "zimage_health" in command:
                assert result.stdout.count('"reachable": true') == 2, said
            assert c.passwords["ops"] not in said
    refused = [e for e in admin.acl_log(count=100) if e.get("username") == "zimage-ops"]
    assert not refused, refused
    ops = c.redis_as("ops")
    assert ops.llen("zimage") >= 0 and ops.hlen("unacked") >= 0            # it reads the queue and what is out
    for write in (lambda: ops.lpush("zimage", "x"), lambda: ops.rpush("zimage", "x"),
                  lambda: ops.brpop(["zimage"], 1), lambda: ops.delete("zimage"),
                  lambda: ops.set("unacked_mutex", "x", nx=True, px=30000), lambda: ops.delete("unacked_mutex"),
                  lambda: ops.hset("unacked", "x", "y"), lambda: ops.hdel("unacked", "x"),
                  lambda: ops.zadd("unacked_index", {"x": 1}), lambda: ops.zrem("unacked_index", "x"),
                  lambda: ops.set("celery-task-meta-x", "y"), lambda: ops.set("anything", "y"),
                  lambda: ops.flushall(), lambda: ops.config_get("*"), lambda: ops.keys("*"),
                  lambda: ops.acl_list()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            write()


def test_a_bad_row_fails_with_comfyuis_error_and_the_rest_run(cluster, tmp_path):
    c = cluster
    rows = tiny_rows(4, "badrow", seed0=500)
    rows[1]["steps"] = 51                       # above the turbo sampler's maximum: ComfyUI refuses the prompt
    out = c.shared / "badrow"
    result = run_batch(c, write_jobs(tmp_path / "jobs.csv", rows), out)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "4 jobs, 3 ok, 1 failed" in result.stdout
    lines = read_log(out / "log.jsonl")
    assert [l["status"] for l in lines] == ["ok", "failed", "ok", "ok"]
    error = lines[1]["error"]
    assert error.startswith("/prompt refused it: Prompt outputs failed validation") and "steps" in error, error
    assert "ZImageTurboSampler #10" in error and not lines[1]["files"]
    assert f"FAILED jobs.csv line 3: {error}" in result.stdout
    assert len(pngs(out)) == 3


def test_a_killed_worker_and_a_redis_restart_lose_nothing_and_duplicate_nothing(cluster, tmp_path):
    """Worker b is frozen while its ComfyUI runs a job, its job is seen unacknowledged in Redis, then b is
    killed (SIGKILL): after the visibility timeout worker a takes that job again, within the bound. Redis is
    restarted mid-run.

    b is taken as killed in the middle of its sweep for lost jobs, a rare case made certain here: it leaves
    kombu's sweep lock ('unacked_mutex') behind, and no worker sweeps until the lock expires (with the earlier
    30 s expiry, b's job came back after about 31 s). The expiry (SWEEP_LOCK_EXPIRE) is shorter than the
    visibility timeout, so the lock is gone before b's job is due and delays nothing."""
    c = cluster
    options = make_app(load_broker(c.url("worker"), env={})).conf.broker_transport_options
    assert options["unacked_mutex_expire"] == SWEEP_LOCK_EXPIRE < VISIBILITY, options
    b = c.servers["b"]
    c.ensure_worker("b")
    n = 40
    rows = tiny_rows(n, "kill", seed0=2000)
    out, jobs = c.shared / "kill", write_jobs(tmp_path / "jobs.csv", rows)
    log = out / "log.jsonl"
    ops = c.redis_as("ops")
    client = subprocess.Popen(batch_args(c, jobs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=c.env("client"))
    try:
        victim, deadline = None, time.monotonic() + 120
        while victim is None:
            assert time.monotonic() < deadline and client.poll() is None, "worker b never ran a job"
            running = b.get("/queue")["queue_running"]
            if not running:
                time.sleep(0.02)
                continue
            os.kill(c.workers["b"].pid, signal.SIGSTOP)          # frozen: it can neither finish nor acknowledge
            prompt = b.get("/queue")["queue_running"]
            taken = [json.loads(v)[0] for v in ops.hvals("unacked")]
            ids = {m["headers"]["id"] for m in taken}
            held = [i for i in ids if prompt and prompt_id_for(i.removeprefix("zimage-")) == prompt[0][1]]
            if held:
                victim = held[0]
            else:
                os.kill(c.workers["b"].pid, signal.SIGCONT)      # it finished in between: try the next job
                time.sleep(0.02)
        # the lock b would leave, killed mid-sweep (kombu: SET unacked_mutex <token> NX PX <unacked_mutex_expire>)
        c.redis_as("admin").set("unacked_mutex", "b-killed-mid-sweep", nx=True, px=SWEEP_LOCK_EXPIRE * 1000)
        c.workers["b"].kill()
        killed_at = time.monotonic()
        c.workers["b"].wait(10)
        # Redis restarted while worker a goes on with the queue
        done_before = len(log.read_text().splitlines()) if log.is_file() else 0
        wait_for(lambda: log.is_file() and len(log.read_text().splitlines()) >= done_before + 3, 60,
                 "worker a did not go on")
        c.redis.restart()
        restarted = True
        redone_after = None
        deadline = time.monotonic() + VISIBILITY + 90
        while client.poll() is None and time.monotonic() < deadline:
            if redone_after is None and log.is_file() and victim in log.read_text():
                redone_after = time.monotonic() - killed_at
            time.sleep(0.05)
        if client.poll() is None:
            ops = c.redis_as("ops")
            pytest.fail(f"the batch did not finish: victim {victim}, unacked {ops.hkeys('unacked')}, "
                        f"queued {ops.llen('zimage')}, log lines {len(log.read_text().splitlines())}")
        stdout, stderr = client.communicate(timeout=30)
    finally:
        client.kill()
    assert restarted and client.returncode == 0, stdout + stderr
    lines = read_log(log)
    check_once_each(lines, out, n)
    [redone] = [l for l in lines if l["task_id"] == victim]
    assert redone["worker"] == "a@test" and redone["redelivered"], redone
    if redone_after is None:
        redone_after = time.monotonic() - killed_at
    record_figure(kill_jobs=n, kill_done=len(lines), kill_lost=n - len(lines), kill_duplicated=0,
                  kill_redelivered=sum(l["redelivered"] for l in lines),
                  seconds_until_killed_job_redone=round(redone_after, 1), visibility_timeout_s=VISIBILITY,
                  restore_interval_s=RESTORE, sweep_lock_expire_s=SWEEP_LOCK_EXPIRE)
    assert redone_after <= VISIBILITY + RESTORE + REDELIVERY_SLACK, (
        f"the killed worker's job ran again {redone_after:.1f} s after, beyond the visibility timeout {VISIBILITY} s "
        f"+ the restore interval {RESTORE} s + {REDELIVERY_SLACK} s")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_wrong_password_and_a_password_on_the_command_line_are_refused(cluster, tmp_path):
    c = cluster
    jobs, out = write_jobs(tmp_path / "jobs.csv", tiny_rows(1, "refused")), tmp_path / "out"
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    env = c.env("client", ZIMAGE_BROKER_PASSWORD_FILE=str(wrong))
    result = subprocess.run([BATCH, "--broker", c.url("client"), "--jobs", str(jobs), "--out", str(out)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nothing was sent" in result.stderr and "refused user 'zimage-client''s password (WRONGPASS)" in result.stderr
    assert "ZIMAGE_BROKER_PASSWORD_FILE" in result.stderr and not out.exists()

    in_url = c.url("client").replace("zimage-client@", f"zimage-client:{c.passwords['client']}@")
    result = subprocess.run([BATCH, "--broker", in_url, "--jobs", str(jobs), "--out", str(out)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env=c.env("client"))
    assert result.returncode == 2 and "the password is written in --broker" in result.stderr, result.stderr
    assert c.passwords["client"] not in result.stdout + result.stderr

    worker = subprocess.run([WORKER, "--broker", c.url("worker"), "--comfyui", c.servers["a"].url],
                            capture_output=True, text=True, timeout=60, cwd=REPO,
                            env=c.env("worker", ZIMAGE_BROKER_PASSWORD_FILE=str(wrong)))
    assert worker.returncode == 2 and "WRONGPASS" in worker.stderr, worker.stdout + worker.stderr
    remote = subprocess.run([WORKER, "--broker", c.url("worker"), "--comfyui", "http://10.0.0.5:8188"],
                            capture_output=True, text=True, timeout=60, cwd=REPO, env=c.env("worker"))
    assert remote.returncode == 2 and "loopback only" in remote.stderr, remote.stderr


def test_each_user_may_do_its_part_only_and_no_secret_is_shown(cluster):
    c = cluster
    client = c.redis_as("client")
    client.ping()
    for refused in (lambda: client.brpop(["zimage"], 1), lambda: client.hgetall("unacked"),
                    lambda: client.delete("zimage"), lambda: client.keys("*"), lambda: client.flushall(),
                    lambda: client.lpush("another-queue", "x"), lambda: client.config_get("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    worker = c.redis_as("worker")
    for refused in (lambda: worker.flushall(), lambda: worker.config_get("*"), lambda: worker.keys("*"),
                    lambda: worker.acl_list()):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=c.redis.port, socket_timeout=5).ping()   # no password: no entry
    # no password on a command line (ps shows those), in a worker's log, or in the ACL file
    for proc in [c.redis.proc, *c.workers.values()]:
        if proc.poll() is None:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            assert not any(p in cmdline for p in c.passwords.values()), cmdline
    logs = "".join(log.read_text(errors="replace") for log in c.worker_logs.values())
    assert logs and not any(p in logs for p in c.passwords.values())
    assert not any(p in c.acl for p in [*c.passwords.values(), c.admin])


def test_tls_required_refuses_plain_and_untrusted_and_runs_jobs_with_the_ca(cluster, tmp_path):
    c = cluster
    cert, key, ca = make_certificates(tmp_path / "certs")
    tls = RedisServer(tmp_path / "redis-tls", c.acl, tls=(cert, key, ca)).start()
    try:
        jobs, out = write_jobs(tmp_path / "jobs.csv", tiny_rows(3, "tls", seed0=3000)), tmp_path / "out"
        base = ["--jobs", str(jobs), "--out", str(out), "--progress", "off"]

        def batch(url, *extra):
            return subprocess.run([BATCH, "--broker", url, *base, *extra], capture_output=True, text=True,
                                  timeout=120, cwd=REPO, env=c.env("client"))

        plain = batch(c.url("client", tls))
        assert plain.returncode == 2 and "if the broker requires TLS, use rediss://" in plain.stderr, plain.stderr
        untrusted = batch(c.url("client", tls, "rediss"))
        assert untrusted.returncode == 2 and "--tls-ca" in untrusted.stderr and "not trusted" in untrusted.stderr, \
            untrusted.stderr
        c.start_worker("tls", c.servers["a"], c.url("worker", tls, "rediss"), "--tls-ca", str(ca), "--no-warmup")
        result = batch(c.url("client", tls, "rediss"), "--tls-ca", ca)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = read_log(out / "log.jsonl")
        assert [l["status"] for l in lines] == ["ok"] * 3 and {l["worker"] for l in lines} == {"tls@test"}
        assert all(l["results"].startswith("result backend") for l in lines), "no --shared-dir: through Redis"
        assert len({Path(f).read_bytes() for l in lines for f in l["files"]}) == 3
    finally:
        proc = c.workers.pop("tls", None)
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        tls.stop()


def test_sigterm_lets_a_worker_finish_its_job_then_stop(cluster, tmp_path):
    """systemctl stop: the job in hand is finished and acknowledged (not given out again), then the worker
    exits 0; the other worker does the rest. Last: it stops worker a."""
    c = cluster
    c.ensure_worker("a")
    c.ensure_worker("b")
    a = c.servers["a"]
    n = 30
    out, jobs = c.shared / "sigterm", write_jobs(tmp_path / "jobs.csv", tiny_rows(n, "sigterm", seed0=4000))
    client = subprocess.Popen(batch_args(c, jobs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, env=c.env("client"))
    try:
        deadline = time.monotonic() + 120
        while not (running := a.get("/queue")["queue_running"]):
            assert time.monotonic() < deadline and client.poll() is None, "worker a never ran a job"
            time.sleep(0.01)
        c.workers["a"].terminate()
        in_hand = running[0][1]
        assert c.workers["a"].wait(60) == 0, c.worker_logs["a"].read_text()[-3000:]
        stdout, stderr = client.communicate(timeout=180)
    finally:
        client.kill()
    assert client.returncode == 0, stdout + stderr
    lines = read_log(out / "log.jsonl")
    check_once_each(lines, out, n)
    [finished] = [l for l in lines if l["prompt_id"] == in_hand]
    assert finished["worker"] == "a@test" and not finished["redelivered"], finished
    assert not any(l["redelivered"] for l in lines), "a clean stop hands nothing back late"
