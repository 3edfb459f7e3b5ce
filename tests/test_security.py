"""What the shipped code never does: open pickles, evaluate strings, add HTTP routes, reach the network."""
from __future__ import annotations

import re

from zimage_dev import REPO

SHIPPED = sorted(p for p in REPO.glob("*.py")) + sorted(REPO.glob("zimage_core/*.py")) + sorted(REPO.glob("nodes/*.py"))


def shipped_sources() -> dict[str, str]:
    assert len(SHIPPED) > 10, "the glob should find the pack's modules"
    return {str(p.relative_to(REPO)): p.read_text() for p in SHIPPED}


def test_no_pickle_eval_exec_or_network():
    forbidden = re.compile(r"\btorch\.load\(|import pickle|pickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\("
                           r"|import urllib|import requests|import socket|http\.client|from_pretrained\(")
    hits = [f"{name}: {m.group(0)}" for name, text in shipped_sources().items() for m in forbidden.finditer(text)]
    assert not hits, hits


def test_no_http_routes():
    hits = [name for name, text in shipped_sources().items() if re.search(r"PromptServer|\broutes\.|add_routes", text)]
    assert not hits, f"the pack must not add HTTP routes: {hits}"


def test_safetensors_is_the_only_weight_reader():
    readers = [name for name, text in shipped_sources().items() if "safe_open" in text or "load_file(" in text]
    assert readers == ["zimage_core/checkpoint.py"], readers
