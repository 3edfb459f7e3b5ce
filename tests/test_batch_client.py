"""zimage-batch against a real ComfyUI server, run as the command a shop would run; plus its row checks and
node finding without a server.

The server tests look at what the server itself did (its /history, the PNGs in its output folder and the
workflow embedded in them), not only at what the client says, so a job sent twice or patched wrongly fails.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree
from zimage_dev.comfy_server import ComfyServer, load_workflow, write_tiny_models

from zimage_batch.jobs import JobsError, load_jobs
from zimage_batch.workflow import Template, WorkflowError, outside_limits

BIN = REPO / ".runtime" / "venv" / "bin"
COMMAND = [str(BIN / "zimage-batch")]
MODULE = [str(BIN / "python"), "-m", "zimage_batch"]
COLUMNS = ["prompt", "negative", "seed", "width", "height", "count", "steps", "cfg", "filename_prefix"]


# A node that holds its prompt until the server is told to interrupt (ComfyUI's own flag, which the client's
# Ctrl-C sets through /interrupt); so a job gated by it cannot finish before the Ctrl-C, however fast the
# machine. A bound of its own, so a test that never interrupts fails instead of hanging the server.
GATE_NODE = """
import time
import comfy.model_management as mm


class ZImageTestGate:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "hold"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, model):
        return float("nan")                 # never cached: every prompt waits here

    def hold(self, model):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            mm.throw_exception_if_processing_interrupted()
            time.sleep(0.02)
        raise RuntimeError("ZImageTestGate: nobody interrupted the prompt within 120 s")


NODE_CLASS_MAPPINGS = {"ZImageTestGate": ZImageTestGate}
"""


def started_server(version, tmp_path_factory, start=True) -> ComfyServer:
    comfyui_tree(version)
    base = tmp_path_factory.mktemp(f"batch-comfy-{version}")
    write_tiny_models(base / "models")
    gate = base / "custom_nodes" / "zimage_test_gate"
    gate.mkdir(parents=True)
    (gate / "__init__.py").write_text(GATE_NODE)
    server = ComfyServer(version, base)
    return server.start() if start else server


def gated_workflow(path: Path) -> Path:
    """The default workflow with the sampler's model passed through ZImageTestGate."""
    workflow = load_workflow("ecommerce_turbo_api.json")
    sampler = next(i for i, n in workflow.items() if n["class_type"] == "ZImageTurboSampler")
    workflow["gate"] = {"class_type": "ZImageTestGate", "inputs": {"model": workflow[sampler]["inputs"]["model"]}}
    workflow[sampler]["inputs"]["model"] = ["gate", 0]
    path.write_text(json.dumps(workflow))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = started_server("0.30.0", tmp_path_factory)
    yield srv
    srv.stop()


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(command, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_log(path) -> list[dict]:
    """The log's lines in job order (they are written as jobs end: a refused job ends before a running one)."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return sorted(lines, key=lambda line: line["line"])


def history_ids(server) -> set[str]:
    return set(server.get("/history"))


def executions(server, at_least: int = 0) -> int:
    """Prompts the server has run since it started, from its own log. A job queued twice under the same
    prompt_id leaves one history entry, and its second run is all cache hits that write no file: only this
    count shows it. The server logs a run just after it tells the client, so wait for at_least runs (and a
    moment more, for any surplus run to show too)."""
    deadline = time.monotonic() + 10
    while server.log_text().count("Prompt executed in") < at_least and time.monotonic() < deadline:
        time.sleep(0.1)
    if at_least:
        time.sleep(0.5)
    return server.log_text().count("Prompt executed in")


def embedded_workflow(png) -> dict:
    """The API workflow the save node wrote into the PNG: what the server really ran."""
    return json.loads(Image.open(png).info["prompt"])


def sampler_inputs(workflow: dict) -> dict:
    return next(n["inputs"] for n in workflow.values() if n["class_type"] in ("ZImageTurboSampler", "KSampler"))


def texts(workflow: dict) -> set[str]:
    return {n["inputs"]["text"] for n in workflow.values() if n["class_type"] == "CLIPTextEncode"}


def saved(server, prefix: str) -> list:
    """Every PNG the server wrote under this prefix, over the whole session (a job run twice writes twice)."""
    return sorted(server.output.glob(f"{prefix}_*.png"))


# ---- against a server ----

def test_csv_jobs_make_pngs_of_the_requested_sizes_and_a_log_line_each(server, tmp_path):
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "a white ceramic mug, studio light", "seed": 11, "width": 256, "height": 256, "count": 1},
        {"prompt": "white running shoes, pastel background", "seed": 22, "width": 256, "height": 192, "count": 2},
        {"prompt": "a perfume bottle on marble", "seed": 33, "width": 192, "height": 256, "count": 1}])
    before, ran = history_ids(server), executions(server)
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    result = run(COMMAND, "--server", server.url, "--jobs", jobs, "--out", out, "--log", log, "--progress", "on")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 jobs, 3 ok, 0 failed; 4 images" in result.stdout
    assert "4/4" in result.stderr, "the progress bar should reach all 4 images"

    lines = read_log(log)
    assert [(l["line"], l["status"], l["seed"], l["width"], l["height"], l["count"]) for l in lines] == [
        (2, "ok", 11, 256, 256, 1), (3, "ok", 22, 256, 192, 2), (4, "ok", 33, 192, 256, 1)]
    for line in lines:
        assert line["error"] is None and line["steps"] == 8 and line["cfg"] == 1.0 and line["seconds"] > 0
        assert line["negative"] and line["submissions"] == 1
        assert len(line["files"]) == line["count"]
        for path in line["files"]:
            assert Image.open(path).size == (line["width"], line["height"])
            used = embedded_workflow(path)
            assert sampler_inputs(used)["seed"] == line["seed"] and line["prompt"] in texts(used)
    files = [f for line in lines for f in line["files"]]
    assert len({open(f, "rb").read() for f in files}) == 4, "distinct seeds and batch entries give distinct images"
    assert history_ids(server) - before == {line["prompt_id"] for line in lines}, "one prompt per job, no more"
    assert executions(server, ran + 3) - ran == 3


def test_jsonl_jobs_set_steps_cfg_negative_and_prefix(server, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "a desk lamp", "seed": 5, "width": 128, "height": 128, "steps": 4,
                    "filename_prefix": "shop/lamp"}) + "\n\n"
        + json.dumps({"prompt": "一把木椅, 电商主图", "negative": "blurry", "seed": "6", "width": 128,
                      "height": 128, "cfg": 1.5, "steps": 2}, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run(MODULE, "--server", server.url, "--jobs", jobs, "--out", out, "--progress", "off")
    assert result.returncode == 0, result.stdout + result.stderr
    lamp, chair = read_log(out / "log.jsonl")
    assert (lamp["line"], lamp["steps"], lamp["cfg"]) == (1, 4, 1.0)
    assert (chair["line"], chair["steps"], chair["cfg"], chair["negative"], chair["seed"]) == (3, 2, 1.5, "blurry", 6)
    [lamp_png] = lamp["files"]
    assert lamp_png.startswith(str(out / "shop" / "lamp_"))
    used = embedded_workflow(chair["files"][0])
    assert sampler_inputs(used)["cfg"] == 1.5 and sampler_inputs(used)["steps"] == 2
    assert texts(used) == {"一把木椅, 电商主图", "blurry"}


def test_bad_rows_are_all_named_and_nothing_is_sent(server, tmp_path):
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "fine", "seed": 1, "width": 128, "height": 128},
        {"prompt": "", "seed": 2},
        {"prompt": "a bag", "seed": "abc"},
        {"prompt": "a hat", "seed": 4, "width": 250, "height": 256},
        {"prompt": "a cup", "count": 0}])
    before = history_ids(server)
    out = tmp_path / "out"
    result = run(COMMAND, "--server", server.url, "--jobs", jobs, "--out", out)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "nothing was sent" in err
    assert "jobs.csv line 3, column 'prompt': missing" in err
    assert "jobs.csv line 4, column 'seed': 'abc' is not a whole number" in err
    assert "jobs.csv line 5, column 'width': 250 is not a multiple of 16" in err
    assert "jobs.csv line 6, column 'count'" in err
    assert "line 2" not in err, "the good row is not an error"
    assert history_ids(server) == before and not server.get("/queue")["queue_pending"]
    assert not out.exists()


def test_jobs_failing_on_the_server_are_logged_and_the_others_still_run(server, tmp_path):
    """A job the sampler refuses while running: cfg 2 with no negative connected."""
    workflow = load_workflow("ecommerce_turbo_api.json")
    sampler = next(i for i, n in workflow.items() if n["class_type"] == "ZImageTurboSampler")
    negative = workflow[sampler]["inputs"].pop("negative")[0]
    del workflow[negative]
    (tmp_path / "no_negative_api.json").write_text(json.dumps(workflow))
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "first", "seed": 1, "width": 128, "height": 128, "filename_prefix": "fail_first"},
        {"prompt": "needs a negative", "seed": 2, "width": 128, "height": 128, "cfg": 2},
        {"prompt": "last", "seed": 4, "width": 128, "height": 128, "filename_prefix": "fail_last"}])
    out = tmp_path / "out"
    result = run(COMMAND, "--server", server.url, "--workflow", tmp_path / "no_negative_api.json",
                 "--jobs", jobs, "--out", out, "--progress", "off")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "3 jobs, 2 ok, 1 failed" in result.stdout
    first, cfg2, last = read_log(out / "log.jsonl")
    assert [first["status"], cfg2["status"], last["status"]] == ["ok", "failed", "ok"]
    assert f"ZImageTurboSampler #{sampler}: cfg above 1 needs a negative" in cfg2["error"], cfg2["error"]
    assert not cfg2["files"] and cfg2["seconds"] is not None
    assert f"FAILED jobs.csv line 3: {cfg2['error']}" in result.stdout
    for line in (first, last):
        assert len(line["files"]) == 1 and Image.open(line["files"][0]).size == (128, 128)


def test_a_prompt_refused_by_the_server_is_reported_with_its_node_errors(server, tmp_path):
    workflow = load_workflow("ecommerce_turbo_api.json")
    loader = next(i for i, n in workflow.items() if n["class_type"] == "ZImageTurboCheckpointLoader")
    workflow[loader]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    (tmp_path / "missing_model_api.json").write_text(json.dumps(workflow))
    jobs = write_csv(tmp_path / "jobs.csv", [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}])
    out = tmp_path / "out"
    result = run(COMMAND, "--server", server.url, "--workflow", tmp_path / "missing_model_api.json",
                 "--jobs", jobs, "--out", out, "--progress", "off")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = read_log(out / "log.jsonl")
    assert [l["status"] for l in lines] == ["failed", "failed"]
    for line in lines:
        assert line["error"].startswith("/prompt refused it: Prompt outputs failed validation"), line["error"]
        assert f"ZImageTurboCheckpointLoader #{loader}: ckpt_name: 'no_such_model.safetensors' not in" in line["error"]
    assert "2 jobs, 0 ok, 2 failed" in result.stdout


def test_rows_outside_the_servers_limits_are_named_before_anything_is_sent(server, tmp_path):
    """The turbo sampler takes at most 50 steps and cfg from 1: the client reads that from /object_info."""
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "fine", "seed": 1, "width": 128, "height": 128},
        {"prompt": "too many steps", "steps": 51},
        {"prompt": "low cfg", "cfg": 0.5}])
    before = history_ids(server)
    out = tmp_path / "out"
    result = run(COMMAND, "--server", server.url, "--jobs", jobs, "--out", out, "--progress", "off")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "nothing was sent" in result.stderr
    assert "jobs.csv line 3, column 'steps': 51 is above ZImageTurboSampler's maximum steps of 50" in result.stderr
    assert "jobs.csv line 4, column 'cfg': 0.5 is below ZImageTurboSampler's minimum cfg of 1" in result.stderr
    assert history_ids(server) == before and not (out / "log.jsonl").exists()


def test_a_job_over_the_timeout_is_interrupted_and_the_next_one_runs(server, tmp_path):
    """The slow job needs far more than the timeout on any machine (1024x1024, 50 steps: tens of seconds on
    CPU), the quick one far less (64x64, 1 step), so this holds on an idle or a loaded machine alike."""
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "slow", "seed": 1, "width": 1024, "height": 1024, "steps": 50, "filename_prefix": "timeout_slow"},
        {"prompt": "quick", "seed": 2, "width": 64, "height": 64, "steps": 1, "filename_prefix": "timeout_quick"}])
    out = tmp_path / "out"
    started = time.monotonic()
    result = run(COMMAND, "--server", server.url, "--jobs", jobs, "--out", out, "--timeout", 4, "--progress", "off")
    assert result.returncode == 1, result.stdout + result.stderr
    slow, quick = read_log(out / "log.jsonl")
    assert slow["status"] == "failed" and slow["error"].startswith("timed out after 4 s"), slow["error"]
    assert "interrupted" in slow["error"] and not slow["files"] and not saved(server, "timeout_slow")
    assert quick["status"] == "ok" and len(saved(server, "timeout_quick")) == 1, result.stderr + server.log_tail(30)
    assert time.monotonic() - started < 90, "the slow job was not stopped"


def test_ctrl_c_stops_the_batch_and_its_prompts_on_the_server(server, tmp_path):
    """No race: the running job waits in ZImageTestGate until the server is interrupted, so it is running
    (and the next one queued) for as long as the test needs to send the Ctrl-C. A job that finished first
    (a 1024², 50-step one did, on a fast machine) can no longer make this pass or fail by timing."""
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "slow", "seed": 1, "width": 64, "height": 64, "steps": 1, "filename_prefix": "cancel_slow"},
        {"prompt": "next", "seed": 2, "width": 64, "height": 64, "steps": 1, "filename_prefix": "cancel_next"}])
    out = tmp_path / "out"
    workflow = gated_workflow(tmp_path / "gated.json")
    # faulthandler: a client that hangs after the Ctrl-C is made to print where each of its threads stands.
    # SIGINT back to its default in the client: a test run started in the background of a non-interactive shell
    # (`cmd &`, as a CI runner may) ignores SIGINT, children inherit that, and Python then never sees the Ctrl-C
    # (seen: the client ran on 60 s after it, receiving from its WebSocket).
    client = subprocess.Popen([*COMMAND, "--server", server.url, "--workflow", str(workflow), "--jobs", str(jobs),
                               "--out", str(out), "--progress", "off"], env={**os.environ, "PYTHONFAULTHANDLER": "1"},
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not (server.get("/queue")["queue_running"] and server.get("/queue")["queue_pending"]):
            assert time.monotonic() < deadline and client.poll() is None, client.communicate()
            time.sleep(0.05)
        signalled = time.monotonic()
        client.send_signal(signal.SIGINT)
        try:
            stdout, stderr = client.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            client.send_signal(signal.SIGABRT)
            stdout, stderr = client.communicate(timeout=30)
            pytest.fail(f"the client still ran 60 s after Ctrl-C; its threads then:\n{stderr[-6000:]}\n{stdout[-2000:]}"
                        f"\nserver:\n{server.log_tail(40)}")
        print(f"Ctrl-C to exit: {time.monotonic() - signalled:.1f} s")
    finally:
        client.kill()
    assert client.returncode == 130, stdout + stderr
    slow, following = read_log(out / "log.jsonl")
    assert slow["error"] == following["error"] == "cancelled (Ctrl-C)"
    deadline = time.monotonic() + 30
    while server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    queue = server.get("/queue")
    assert not queue["queue_running"] and not queue["queue_pending"], "the batch's prompts went on without it"
    assert following["prompt_id"] not in server.get("/history")
    assert not saved(server, "cancel_slow") and not saved(server, "cancel_next")


def test_an_absent_server_fails_every_job_after_the_retries(tmp_path):
    jobs = write_csv(tmp_path / "jobs.csv", [{"prompt": "a"}, {"prompt": "b"}])
    with socket.socket() as s:                      # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    result = run(COMMAND, "--server", f"127.0.0.1:{port}", "--jobs", jobs, "--out", out, "--retries", 2,
                 "--progress", "off", timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 jobs, 0 ok, 2 failed" in result.stdout and "failed 2 times" in result.stdout
    assert [l["status"] for l in read_log(out / "log.jsonl")] == ["failed", "failed"]


def test_core_ksampler_workflow(server, tmp_path):
    jobs = write_csv(tmp_path / "jobs.csv", [{"prompt": "a linen shirt", "negative": "wrinkles", "seed": 77,
                                              "width": 128, "height": 160, "cfg": 2}])
    out = tmp_path / "out"
    result = run(COMMAND, "--server", server.url, "--workflow", REPO / "workflows" / "ecommerce_checkpoint_api.json",
                 "--jobs", jobs, "--out", out, "--progress", "off")
    assert result.returncode == 0, result.stdout + result.stderr
    [line] = read_log(out / "log.jsonl")
    [png] = line["files"]
    used = embedded_workflow(png)
    assert Image.open(png).size == (128, 160) and texts(used) == {"a linen shirt", "wrinkles"}
    assert (sampler_inputs(used)["seed"], sampler_inputs(used)["cfg"]) == (77, 2)


def test_the_example_jobs_file_fits_the_default_workflow():
    result = run(COMMAND, "--jobs", REPO / "workflows" / "batch_example.csv", "--check", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 jobs, 5 images: all rows are valid" in result.stdout


def test_resume_skips_jobs_done_before_whose_files_are_still_there(server, tmp_path):
    vase = {"prompt": "a vase", "seed": 1, "width": 64, "height": 64, "filename_prefix": "resume_vase"}
    clock = {"prompt": "a clock", "seed": 2, "width": 64, "height": 64, "filename_prefix": "resume_clock"}
    jobs, out = tmp_path / "jobs.csv", tmp_path / "out"
    args = ["--server", server.url, "--jobs", jobs, "--out", out, "--progress", "off", "--resume"]
    write_csv(jobs, [vase])
    assert run(COMMAND, *args).returncode == 0
    [first] = read_log(out / "log.jsonl")

    write_csv(jobs, [vase, clock])                               # a row added: only it runs
    ran = executions(server)
    result = run(COMMAND, *args)
    assert result.returncode == 0 and "1 jobs (1 done before, skipped), 1 ok" in result.stdout, result.stdout
    assert "jobs.csv line 2: done in an earlier run" in result.stderr
    assert executions(server, ran + 1) == ran + 1

    Path(first["files"][0]).unlink()                               # an image gone: that job runs again
    result = run(COMMAND, *args)
    assert result.returncode == 0 and "1 jobs (1 done before, skipped), 1 ok" in result.stdout, result.stdout
    assert "jobs.csv line 3: done in an earlier run" in result.stderr
    last = json.loads((out / "log.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert last["line"] == 2 and last["status"] == "ok" and last["files"] != first["files"]
    assert executions(server, ran + 2) == ran + 2


class CutFirstPromptAnswer:
    """A TCP relay in front of the server that passes the first POST /prompt through, then cuts the connection
    before the answer reaches the client ("cut"), or answers 502 in its place as a proxy that lost the server
    would ("gateway"): either way the job is queued, but the client cannot know it."""

    BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def __init__(self, port: int, mode: str = "cut"):
        self.target, self.mode = port, mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cut = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            state = {"cutting": False}
            for src, dst, from_client in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self.pump, args=(src, dst, from_client, state), daemon=True).start()

    def pump(self, src, dst, from_client, state):
        try:
            while data := src.recv(65536):
                if from_client and not self.cut and data.startswith(b"POST /prompt"):
                    self.cut, state["cutting"] = 1, True
                if not from_client and state["cutting"]:
                    if self.mode == "gateway":
                        dst.sendall(self.BAD_GATEWAY)
                    break                                   # the server's answer: dropped with the connection
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self.listener.close()


@pytest.mark.parametrize("mode", ["cut", "gateway"])
def test_a_lost_prompt_answer_does_not_send_the_job_twice(server, tmp_path, mode):
    relay = CutFirstPromptAnswer(server.port, mode)
    try:
        jobs = write_csv(tmp_path / "jobs.csv", [
            {"prompt": "a teapot", "seed": 7, "width": 128, "height": 128, "filename_prefix": f"{mode}_teapot"},
            {"prompt": "a kettle", "seed": 8, "width": 128, "height": 128, "filename_prefix": f"{mode}_kettle"}])
        before, ran = history_ids(server), executions(server)
        out = tmp_path / "out"
        result = run(COMMAND, "--server", relay.url, "--jobs", jobs, "--out", out, "--progress", "off")
    finally:
        relay.close()
    assert relay.cut == 1, "the relay never cut a /prompt answer: the test did not test anything"
    assert result.returncode == 0, result.stdout + result.stderr
    assert "connection lost" in result.stderr
    lines = read_log(out / "log.jsonl")
    assert [l["status"] for l in lines] == ["ok", "ok"]
    assert history_ids(server) - before == {l["prompt_id"] for l in lines}
    assert executions(server, ran + 2) - ran == 2, "a job was queued twice"
    assert len(saved(server, f"{mode}_teapot")) == len(saved(server, f"{mode}_kettle")) == 1


def test_the_client_waits_for_a_server_that_starts_late(tmp_path_factory, tmp_path):
    late = started_server("0.30.0", tmp_path_factory, start=False)
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": f"product {i}", "seed": i, "width": 128, "height": 128, "filename_prefix": f"late_{i}"}
        for i in range(3)])
    out = tmp_path / "out"
    client = subprocess.Popen([*COMMAND, "--server", late.url, "--jobs", str(jobs), "--out", str(out),
                               "--retries", "12", "--progress", "off"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(3)
        assert client.poll() is None, "the client gave up before the server came"
        late.start()
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stdout + stderr
        assert "connection lost" in stderr
        lines = read_log(out / "log.jsonl")
        assert [l["status"] for l in lines] == ["ok"] * 3
        assert history_ids(late) == {l["prompt_id"] for l in lines} and executions(late, 3) == 3
        assert all(len(saved(late, f"late_{i}")) == 1 for i in range(3))
    finally:
        client.kill()
        late.stop()


def test_0_3_75_server(tmp_path_factory, tmp_path):
    old = started_server("0.3.75", tmp_path_factory)
    try:
        jobs = write_csv(tmp_path / "jobs.csv", [
            {"prompt": "a leather wallet", "seed": 1, "width": 128, "height": 192, "count": 2},
            {"prompt": "a silk scarf", "seed": 2, "width": 192, "height": 128}])
        out = tmp_path / "out"
        result = run(COMMAND, "--server", old.url, "--jobs", jobs, "--out", out, "--progress", "off")
        assert result.returncode == 0, result.stdout + result.stderr
        lines = read_log(out / "log.jsonl")
        assert [Image.open(f).size for l in lines for f in l["files"]] == [(128, 192)] * 2 + [(192, 128)]
        assert history_ids(old) == {l["prompt_id"] for l in lines} and executions(old, 2) == 2
    finally:
        old.stop()


def test_a_server_restart_mid_run_loses_no_job_and_runs_none_twice(server, tmp_path):
    """The server is stopped while the long second job runs (the third waits in its queue) and started again:
    both are lost with the server's memory and sent again; the finished first one is not. Last in the file:
    it restarts the shared server."""
    jobs = write_csv(tmp_path / "jobs.csv", [
        {"prompt": "quick", "seed": 1, "width": 128, "height": 128, "filename_prefix": "restart_quick"},
        {"prompt": "long", "seed": 2, "width": 512, "height": 512, "steps": 40, "filename_prefix": "restart_long"},
        {"prompt": "queued", "seed": 3, "width": 128, "height": 128, "filename_prefix": "restart_queued"}])
    out = tmp_path / "out"
    log = out / "log.jsonl"
    client = subprocess.Popen([*COMMAND, "--server", server.url, "--jobs", str(jobs), "--out", str(out),
                               "--retries", "12", "--progress", "off"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = server.get("/queue")["queue_running"]
            long_running = any(sampler_inputs(item[2])["steps"] == 40 for item in running)
            queued = len(server.get("/queue")["queue_pending"]) == 1      # the third is sent, waiting
            if long_running and queued and log.is_file() and len(read_log(log)) == 1:
                break
            assert client.poll() is None, client.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the long job never started")
        server.stop()
        time.sleep(1)
        server.start()
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stdout + stderr
        quick, long, queued = read_log(log)
        assert [quick["status"], long["status"], queued["status"]] == ["ok"] * 3, stderr
        assert (quick["submissions"], long["submissions"], queued["submissions"]) == (1, 2, 2)
        assert "sending it again" in stderr
        assert executions(server, 2) == 2, "since the restart the server should have run the two lost jobs only"
        for name in ("restart_quick", "restart_long", "restart_queued"):
            assert len(saved(server, name)) == 1, f"{name}: {saved(server, name)}"
        assert Image.open(long["files"][0]).size == (512, 512)
    finally:
        client.kill()


# ---- without a server ----

def renumbered(workflow: dict, offset: int = 100) -> dict:
    """The same graph under other node ids, as a re-exported workflow would have."""
    ids = {old: str(int(old) + offset) for old in workflow}

    def relink(value):
        return [ids[value[0]], value[1]] if isinstance(value, list) and len(value) == 2 else value

    return {ids[i]: {"class_type": n["class_type"], "inputs": {k: relink(v) for k, v in n["inputs"].items()}}
            for i, n in workflow.items()}


def one_job(tmp_path, **row):
    return load_jobs(write_csv(tmp_path / "one.csv", [row]))[0]


@pytest.mark.parametrize("name", ["ecommerce_turbo_api.json", "ecommerce_checkpoint_api.json"])
def test_nodes_are_found_by_class_not_by_id(tmp_path, name):
    workflow = renumbered(load_workflow(name))
    template = Template.from_workflow(workflow)
    job = one_job(tmp_path, prompt="a mug", negative="blurry", seed=9, width=320, height=160, count=3, steps=6,
                  cfg=1.5, filename_prefix="shop/mug")
    patched, values = template.apply(job)
    by_class = {}
    for node in patched.values():
        by_class.setdefault(node["class_type"], []).append(node["inputs"])
    sampler = sampler_inputs(patched)
    assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (9, 6, 1.5)
    assert patched[sampler["positive"][0]]["inputs"]["text"] == "a mug"
    assert patched[sampler["negative"][0]]["inputs"]["text"] == "blurry"
    latent = patched[sampler["latent_image"][0]]["inputs"]
    assert (latent["width"], latent["height"], latent["batch_size"]) == (320, 160, 3)
    prefixes = [n["inputs"]["filename_prefix"] for n in patched.values() if "filename_prefix" in n["inputs"]]
    assert prefixes == ["shop/mug"]
    assert values == {"prompt": "a mug", "negative": "blurry", "seed": 9, "steps": 6, "cfg": 1.5, "width": 320,
                      "height": 160, "count": 3, "filename_prefix": "shop/mug"}
    assert workflow == renumbered(load_workflow(name)), "the template itself is left as it was"


def test_size_node_gets_the_custom_aspect_and_a_zeroed_negative_is_not_a_prompt(tmp_path):
    workflow = load_workflow("ecommerce_turbo_api.json")
    sampler = next(i for i, n in workflow.items() if n["class_type"] == "ZImageTurboSampler")
    workflow["50"] = {"class_type": "ZImageTurboSize", "inputs": {"aspect": "16:9", "base": 1024, "batch_size": 1}}
    workflow["51"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    workflow[sampler]["inputs"].update(latent_image=["50", 0], negative=["51", 0])
    template = Template.from_workflow(workflow)
    assert template.negative is None and template.positive == "6"
    patched, values = template.apply(one_job(tmp_path, prompt="x", width=512, height=256, count=2))
    assert patched["50"]["inputs"] == {"aspect": "custom", "base": 1024, "batch_size": 2, "width": 512, "height": 256}
    _, values = template.apply(one_job(tmp_path, prompt="x"))
    assert values["width"] is None, "a preset's size is the node's to compute, not the client's to guess"
    with pytest.raises(WorkflowError, match="column 'negative'"):
        template.apply(one_job(tmp_path, prompt="x", negative="blurry"))


@pytest.mark.parametrize("change,message", [
    (lambda wf: wf.update({"99": dict(wf["10"])}), "exactly one sampler"),
    (lambda wf: wf["10"]["inputs"].update(positive=["5", 0]), "positive input"),
    (lambda wf: wf.pop("11"), "no save node"),
])
def test_templates_the_client_cannot_fill_are_refused(change, message):
    workflow = load_workflow("ecommerce_turbo_api.json")
    change(workflow)
    with pytest.raises(WorkflowError, match=message):
        Template.from_workflow(workflow)
    with pytest.raises(WorkflowError, match="canvas format"):
        Template.from_workflow({"nodes": [], "links": []})


def test_the_client_needs_neither_torch_nor_comfyui():
    """Shops run it on any machine that reaches the server: importing it must not pull the engine in."""
    code = ("import sys; sys.modules.update(torch=None, comfy=None, zimage_core=None); "
            "import zimage_batch.cli, zimage_batch.batch, zimage_batch.client, zimage_batch.jobs, zimage_batch.workflow")
    result = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_jsonl_and_csv_row_errors_name_line_and_column(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        '{"prompt": "ok", "seed": 1}',
        '{"prompt": "ok", "seed": 1.5}',
        '{"prompt": "ok", "seed": true}',
        '{"prompt": "ok", "sead": 3}',
        '{"prompt": "ok", "width": 512}',
        'not json',
        '{"prompt": "ok", "cfg": "nan", "filename_prefix": "../up"}']), encoding="utf-8")
    with pytest.raises(JobsError) as e:
        load_jobs(path)
    problems = e.value.problems
    assert problems[0] == "jobs.jsonl line 2, column 'seed': 1.5 is not a whole number"
    assert problems[1] == "jobs.jsonl line 3, column 'seed': True is not a whole number"
    assert problems[2].startswith("jobs.jsonl line 4: unknown keys ['sead']")
    assert problems[3].startswith("jobs.jsonl line 5, columns 'width'/'height': give both")
    assert problems[4].startswith("jobs.jsonl line 6: not valid JSON")
    assert problems[5].startswith("jobs.jsonl line 7, column 'cfg'") and "filename_prefix" in problems[6]
    assert len(problems) == 7

    spreadsheet = tmp_path / "sheet.csv"   # Excel's UTF-8 CSV: a byte-order mark, capitalised headers, CRLF
    spreadsheet.write_bytes("\ufeffPrompt,Seed,Count\r\n一只杯子,42,2\r\n\r\n".encode("utf-8"))
    [job] = load_jobs(spreadsheet)
    assert (job.prompt, job.seed, job.count, job.line) == ("一只杯子", 42, 2, 2)
    extra = tmp_path / "extra.csv"
    extra.write_text("prompt,seed\na,1,oops\n", encoding="utf-8")
    with pytest.raises(JobsError, match="extra.csv line 2: 3 cells for 2 columns"):
        load_jobs(extra)


def test_limits_come_from_the_servers_node_specs(tmp_path):
    template = Template.from_workflow(load_workflow("ecommerce_checkpoint_api.json"))
    job = one_job(tmp_path, prompt="x", steps=30, width=64, height=64, count=5)
    workflow, _ = template.apply(job)
    info = {"KSampler": {"input": {"required": {"steps": ["INT", {"min": 1, "max": 20}], "seed": ["INT", {}]}}},
            "EmptyLatentImage": {"input": {"required": {"batch_size": ["INT", {"min": 1, "max": 4}]}}}}
    assert outside_limits(job, workflow, template.patched_nodes, info) == [
        "one.csv line 2, column 'steps': 30 is above KSampler's maximum steps of 20",
        "one.csv line 2, column 'count': 5 is above EmptyLatentImage's maximum batch_size of 4"]
    del info["EmptyLatentImage"]
    assert outside_limits(job, workflow, template.patched_nodes, info)[-1].startswith(
        "the server has no node EmptyLatentImage")
