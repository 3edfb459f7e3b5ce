"""What may import what: the core package never imports ComfyUI; nothing shipped imports the developer harness
(zimage_dev/); tests, scripts and benchmarks import each other as packages from the repository root, with no
`sys.path` edits and no import cycles, and no test module imports another."""
import ast
import subprocess
import sys

from zimage_dev import REPO

MODULES = ["checkpoint", "config", "dit", "errors", "fastpath", "formats", "keys", "layers", "loading", "lora", "memory",
           "pipeline", "precision", "quant", "rope", "sampling", "text_encoder", "tokenizer", "vae"]
SHIPPED = ["__init__.py", "nodes", "zimage_core", "zimage_batch", "zimage_queue"]
DEV = ["tests", "scripts", "bench", "zimage_dev"]


def test_core_imports_with_comfy_blocked():
    code = ("import sys\n"
            "for name in ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server', 'comfy_extras'):\n"
            "    sys.modules[name] = None\n"
            + "".join(f"import zimage_core.{m}\n" for m in MODULES) +
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_core_module_is_checked():
    found = sorted(p.stem for p in (REPO / "zimage_core").glob("*.py") if p.stem != "__init__")
    assert found == sorted(MODULES)


def python_files(roots: list[str]):
    for root in roots:
        path = REPO / root
        yield from [path] if path.is_file() else sorted(path.rglob("*.py"))


def imported(path) -> set[str]:
    """Every module name the file imports (absolute imports; relative ones stay inside their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_shipped_imports_the_harness():
    bad = {str(p.relative_to(REPO)): sorted(n for n in imported(p) if n.split(".")[0] in ("zimage_dev", *DEV))
           for p in python_files(SHIPPED)}
    assert not {k: v for k, v in bad.items() if v}


def test_no_path_edits_outside_the_one_that_imports_comfyui():
    """ComfyUI is an application, not a package: zimage_dev/comfy_tree.py puts its tree on the path, and that is
    the one edit. Everything else imports from the repository root."""
    edits = {str(p.relative_to(REPO)) for p in python_files(DEV + SHIPPED)
             if any(s in p.read_text(encoding="utf-8") for s in ("sys.path.insert", "sys.path.append", "sys.path[:"))}
    assert edits == {"zimage_dev/comfy_tree.py", "tests/test_boundary.py"}


def module_name(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[1:] if rel.parts[0] == "tests" else rel.parts)     # pytest puts tests/ on the path


def test_the_tests_scripts_and_benchmarks_import_without_cycles():
    files = {module_name(p): p for p in python_files(DEV)}
    graph = {}
    for name, path in files.items():
        graph[name] = {n for n in imported(path) if n in files and n != name}
    assert not [n for n in graph if n.startswith("test_") and graph[n] & {m for m in files if m.startswith("test_")}
                or "conftest" in graph[n]], "a test module imports another test module or conftest"
    state: dict[str, int] = {}                        # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 40 and graph["test_server"] >= {"zimage_dev.comfy_server"}     # the graph was read


def test_the_nodes_use_the_file_format_side_of_zimage_core_not_the_reference_engine():
    """The nodes build core's model, CLIP and VAE: from zimage_core they take the file reading (checkpoint, keys,
    formats, loading), the configs and size checks, precision, LoRA keys, the schedule and the one fp16 guard
    rule; never the engine's models, pipeline, memory policies or fast path."""
    engine = {"dit", "rope", "pipeline", "memory", "fastpath", "tokenizer"}
    used = set()
    for path in python_files(["nodes"]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("zimage_core"):
                parts = node.module.split(".")
                used.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    assert used and not used & engine, sorted(used & engine)
    assert {"loading", "config", "errors"} <= used                  # the walk found the imports
