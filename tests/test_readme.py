"""README.md as a user follows it: every command and code block in it is run here (or, for the test command,
by .ci/run), against a real ComfyUI where it needs one. Long commands run with smaller sizes appended to the
README's own arguments (argparse takes the last value), so the same program and flags are exercised."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from PIL import Image

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree, tokenizer_dir
from zimage_dev.comfy_server import ComfyServer, write_tiny_models

README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON = str(REPO / ".runtime" / "venv" / "bin" / "python")
DEFAULT_URL = "http://127.0.0.1:8188"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def bash_commands() -> list[str]:
    return [line.strip() for block in blocks("bash") for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def run(cmd: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, shell=True, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"`{cmd}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"snippet exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def command(prefix: str) -> str:
    found = [c for c in bash_commands() if prefix in c]
    assert len(found) == 1, f"README should have one command with '{prefix}', has {found}"
    return found[0]


# Each README command, and the test below that runs it.
COVERED = {
    "bash scripts/demo.sh": "test_demo_command",
    "bash scripts/test.sh -m fast": "test_the_fast_command_selects_the_in_process_tests",
    "bash scripts/test.sh": "test_the_test_command_is_what_ci_runs",
    "zimage-batch --server": "test_batch_commands",
    "zimage-batch --jobs": "test_batch_commands",
    "-m bench.cpu_dit": "test_benchmark_commands",
    "-m bench.gpu": "test_benchmark_commands",
    "-m bench.memory_estimate": "test_benchmark_commands",
    "-m scripts.soak": "test_soak_command",
}


def test_every_readme_command_is_covered():
    commands = bash_commands()
    assert commands, "no commands found in README"
    for c in commands:
        assert any(key in c for key in COVERED), f"README command not run by any test: {c}"
        assert COVERED[next(key for key in COVERED if key in c)] in globals()
    # the two commands come first, each alone on its line
    assert commands[:2] == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def test_the_test_command_is_what_ci_runs():
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def collected(*args: str) -> list[str]:
    out = subprocess.run([PYTHON, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("tests/")]


def test_the_fast_command_selects_the_in_process_tests():
    """What `-m fast` selects (the full suite runs those tests too): nothing that starts ComfyUI, Chromium, Redis
    or a diffusers reference (the test functions of those modules that do are all deselected; a module's static
    checks may stay), and a good part of the rest."""
    fast, every = collected("-m", "fast"), collected()
    print(f"fast tier: {len(fast)} of {len(every)} tests")
    assert set(fast) < set(every) and len(fast) > len(every) // 4
    for module in ("test_browser", "test_queue", "test_controlnet_diffusers", "test_quantized_server",
                   "test_core_nodes", "test_fun_control", "test_official_templates"):
        assert not [t for t in fast if t.startswith(f"tests/{module}.py")], module
    for test in ("test_server.py::test_pack_loads_without_errors", "test_readme.py::test_demo_command",
                 "test_sampler_choice.py::", "test_example_workflows.py::test_workflow_runs_over_prompt"):
        assert [t for t in every if t.startswith(f"tests/{test}")], f"{test} is no longer collected: update this"
        assert not [t for t in fast if t.startswith(f"tests/{test}")], test
    assert any(t.startswith("tests/test_sampling.py") for t in fast)


def test_demo_command():
    comfyui_tree("0.30.0")
    out = run(command("scripts/demo.sh"), timeout=600)
    png = out.stdout.strip().splitlines()[-1]
    with Image.open(png) as image:
        assert image.size == (1024, 1024)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfyui_tree("0.30.0")
    base = tmp_path_factory.mktemp("readme-comfy")
    write_tiny_models(base / "models")
    with ComfyServer("0.30.0", base) as srv:
        yield srv


def test_rest_snippet(server):
    """The README's Python /prompt example, pointed at the test server, queues a job that then succeeds."""
    snippet = next(b for b in blocks("python") if "/prompt" in b)
    assert DEFAULT_URL in snippet
    out = run_python(snippet.replace(DEFAULT_URL, server.url), timeout=60)
    prompt_id = out.stdout.strip().splitlines()[-1]
    entry = server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success"
    [png] = server.output_files(entry)
    with Image.open(png) as image:
        assert image.size == (1024, 1024)


def test_batch_commands(server, tmp_path):
    submit = command("zimage-batch --server")
    assert DEFAULT_URL in submit
    out_dir = tmp_path / "batch_out"
    run(submit.replace(DEFAULT_URL, server.url).replace("--out batch_out", f"--out {out_dir}"), timeout=600)
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    jobs = (REPO / "workflows" / "batch_example.csv").read_text(encoding="utf-8").strip().splitlines()[1:]
    assert len(log) == len(jobs) and all(entry["status"] == "ok" for entry in log)
    assert all((out_dir / f).is_file() or os.path.isfile(f) for entry in log for f in entry["files"])
    run(command("zimage-batch --jobs"), timeout=60)                 # --check: rows only, no server needed
    # the README's CSV example is a valid jobs file too
    csv = next(b for b in blocks("csv"))
    (tmp_path / "jobs.csv").write_text(csv, encoding="utf-8")
    run(f"{PYTHON} -m zimage_batch --jobs {tmp_path / 'jobs.csv'} --check", timeout=60)


def test_batch_extra_lists_the_clients_libraries():
    """`pip install -e '.[batch]'` (README) installs what zimage_batch imports."""
    import tomllib
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["batch"]
    names = {re.split(r"[<>=\[ ]", spec)[0].lower() for spec in extra}
    assert {"requests", "websocket-client", "tqdm"} <= names


def test_benchmark_commands(tmp_path):
    env = {"ZIMAGE_BENCH_RESULTS": str(tmp_path)}
    cpu = run(command("-m bench.cpu_dit") + " --sizes 64 --runs 1 --dtype fp32", timeout=600, env=env)
    assert "pack (fast path)" in cpu.stdout and "pack/core" in cpu.stdout
    gpu = command("-m bench.gpu")
    import torch
    if not torch.cuda.is_available():                                # as written it needs CUDA: says so, stops
        assert "needs a CUDA device" in run(gpu, timeout=120, env=env).stdout
    smoke = run(gpu + " --smoke --no-core --variants pack --sizes 64 --batches 1 --runs 1", timeout=600, env=env)
    assert "memory policies" in smoke.stdout
    estimate = run(command("-m bench.memory_estimate"), timeout=600, env=env)
    assert "swap + fp8" in estimate.stdout and "predicted device memory" in estimate.stdout
    assert len(list(tmp_path.glob("*.json"))) >= 3


def test_soak_command():
    started = time.monotonic()
    out = run(command("-m scripts.soak") + " --prompts 8 --clients 4 --sequential 4", timeout=900)
    assert "lost" in out.stdout
    print(out.stdout[-1500:], f"({time.monotonic() - started:.0f} s)")


def test_engine_snippet(tmp_path):
    """The README's engine example on tiny split files, on the CPU."""
    from zimage_dev import synthetic
    snippet = next(b for b in blocks("python") if "load_zimage" in b)
    files = synthetic.write_split_files(tmp_path / "models")
    code = (snippet.replace('"models/diffusion_models/z_image_turbo_bf16.safetensors"', repr(str(files.dit)))
            .replace('"models/text_encoders/qwen_3_4b.safetensors"', repr(str(files.text_encoder)))
            .replace('"models/vae/ae.safetensors"', repr(str(files.vae)))
            .replace('"ComfyUI/comfy/text_encoders/qwen25_tokenizer"', repr(str(tokenizer_dir())))
            .replace('"cuda"', '"cpu"'))
    code += "\nassert tuple(images.shape) == (1, 1024, 1024, 3), images.shape\nprint('ok')\n"
    assert code.count("'cpu'") + code.count('"cpu"') >= 2
    out = run_python(code, timeout=300)
    assert out.stdout.strip().endswith("ok")
