"""Every core node that takes or returns MODEL, run on the pack's MODEL and on core's, in a real server.

For each ComfyUI version, one server: /object_info lists the nodes; each core node with a MODEL input runs twice
in a tiny job, once on the pack's ZImageTurboLoader MODEL and once on core's UNETLoader MODEL, both read from the
same full-width Z-Image file (zimage_dev/wide_files.py: dim 3840, two layers). Its other inputs get
/object_info's defaults, or small stand-ins made by core nodes (prompt, latent, image, mask, sampler, sigmas);
downstream of it core's own KSampler (or SamplerCustom / SamplerCustomAdvanced for SIGMAS and GUIDER) samples
64x64 in one step at cfg 1 (one model pass per job: ~330 jobs on a 1.1 B model must fit a CPU). Results:
  same as core      both images within 1/255 (or the files an output node writes hold equal tensors)
  DIFFERS           anything else: a bug in the pack's MODEL, printed loudly
  refused by both   the same error on both models (a node for another architecture, say)
  not applicable    the node needs an input no core node here can make, or takes no MODEL (loaders)
All branches of a version go into one prompt (ComfyUI caches what ran, so after a refusal the prompt is posted
again without that branch and only the rest runs). Writes docs/model_nodes.md and docs/model_nodes.json.

    .runtime/venv/bin/python -m scripts.model_node_table [--versions 0.30.0 0.3.75] [--nodes A B ...]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

import numpy as np

from zimage_dev import REPO
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.wide_files import CONTROL, FIXTURES, WIDE, fixture_files, link

VERSIONS = ("0.30.0", "0.3.75")
SIZE, STEPS, SEED, CFG = 64, 1, 31, 1.0    # one model pass per job: the run must fit in minutes
KEEP_LOG: Path | None = None                                        # --keep-log: the servers' logs go here
TOLERANCE = 1                                                       # /255, as in tests/test_core_nodes.py

SAME, DIFFERS, REFUSED, NA = "same as core", "DIFFERS", "refused by both", "not applicable"
SIDES = ("pack", "core")

# Nodes this survey does not run, and why (each would pass its inputs, so the reason has to be written down).
NOT_RUN = {
    "TorchCompileModel": "compiles the model with inductor at the first step: minutes on a CPU; no pixels change",
    "LoraSave": "extracts a LoRA by an SVD of every weight of model_diff: ~25 s a weight here, an hour for both",
    "TrainLoraNode": "trains a LoRA (backward passes through the 1.1 B model): too slow for a CPU survey",
}

# Why a difference found is what it is (the row still says DIFFERS: the table must not hide one).
KNOWN_CAUSES = {
    "ModelComputeDtype": "its default 'default' drops the model's manual cast: the pack's model keeps the file's "
                         "bf16 weights (cast to fp32 per layer on a CPU), core's UNETLoader upcasts them to fp32 on "
                         "a CPU, so the pack's now computes in bf16 and core's in fp32",
}
# A cause that holds only when the tensors apart are exactly these: 0.3.75's NextDiT has a norm_final no Z-Image
# file holds and no forward reads; core's loader leaves it uninitialised (it logs "unet missing:
# ['norm_final.weight']") and saves whatever memory held, the pack's loader fills it with ones.
UNREAD_BY_CORE = {"diffusion_model.norm_final.weight", "model.diffusion_model.norm_final.weight"}
CAUSE_UNREAD = ("the only tensor apart is norm_final.weight, which no Z-Image file holds and no forward reads: "
                "core's loader leaves it uninitialised memory (core logs \"unet missing: ['norm_final.weight']\") "
                "and saves that; the pack's holds ones")

# Optional inputs a node cannot work without (its schema marks them optional because any one of them will do).
OPTIONAL_USED = {"ZImageFunControlnet": ["image"]}

# Numbers a node's defaults set for a full job, cut to the survey's tiny one.
SMALL = {"steps": STEPS, "width": SIZE, "height": SIZE, "batch_size": 1, "length": 1}


# ---- fixture files ----

def prepare_base(base: Path, fixtures: Path) -> None:
    """A ComfyUI base directory: the pack's tiny text encoder and VAE, the wide DiT and ControlNet hard-linked
    (no copy of 2.2 GB), the LoRAs, and a 64x64 input image."""
    from PIL import Image
    write_tiny_models(base / "models")
    for sub, name in (("diffusion_models", WIDE), ("model_patches", CONTROL)):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
        link(fixtures / name, base / "models" / sub / name)
    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)
    for lora in sorted((fixtures / "loras").iterdir()):
        link(lora, base / "models" / "loras" / lora.name)
    (base / "input").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(base / "input" / "survey.png")


# ---- the prompt ----

def common_nodes(server: ComfyServer) -> dict:
    """What every branch shares: both loaders on the same file, the prompt and a negative, a latent, an image, a
    mask, core's euler sampler and a noise source."""
    info = server.object_info()
    loader = info["ZImageTurboLoader"]["input"]["required"]
    tiny = lambda key: next(n for n in loader[key][0] if "tiny" in n)   # noqa: E731
    nodes = {
        "L": {"class_type": "ZImageTurboLoader", "inputs": {
            "unet_name": WIDE, "clip_name": tiny("clip_name"), "vae_name": tiny("vae_name"), "weight_dtype": "bf16"}},
        "U": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE, "weight_dtype": "default"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["L", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["L", 1]}},
        # core's empty latent for 16-channel models: nodes that pass a latent through unsampled keep its channels
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "survey.png"}},
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE, "height": SIZE}},
        "ks": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
    }
    return nodes


MODEL_OF = {"pack": ["L", 0], "core": ["U", 0]}


def sigmas_node(model) -> dict:
    return {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "simple", "steps": STEPS,
                                                       "denoise": 1.0}}


class NotApplicable(Exception):
    """The node needs an input this survey cannot make; the message says which."""


def value_for(name: str, spec: list, model, extra: dict, key: str):
    """The value given to one required input (a link or a literal); `extra` collects helper nodes it needs."""
    typ, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if name == "filename_prefix":
        return key                       # what an output node writes, found again by the branch's key
    if isinstance(typ, list) or typ == "COMBO":
        options = typ if isinstance(typ, list) else opts.get("options", [])
        if not options:
            raise NotApplicable(f"'{name}' lists no choices (needs a file this survey does not have)")
        return opts.get("default", options[0])
    if typ in ("INT", "FLOAT"):
        value = SMALL.get(name, opts.get("default", opts.get("min", 0)))
        return max(opts.get("min", value), min(opts.get("max", value), value))
    if typ == "BOOLEAN":
        return opts.get("default", False)
    if typ == "STRING":
        return opts.get("default", "")
    if typ == "CONDITIONING":
        return ["neg", 0] if "neg" in name else ["pos", 0]
    if typ == "MODEL_PATCH":             # in the branch: a version whose loader cannot read the file refuses it
        extra[f"{key}_mp"] = {"class_type": "ModelPatchLoader", "inputs": {"name": CONTROL}}
        return [f"{key}_mp", 0]
    if typ == "SIGMAS":
        extra[f"{key}_sig"] = sigmas_node(model)
        return [f"{key}_sig", 0]
    made = {"MODEL": model, "CLIP": ["L", 1], "VAE": ["L", 2], "LATENT": ["lat", 0], "IMAGE": ["img", 0],
            "MASK": ["mask", 0], "SAMPLER": ["ks", 0], "NOISE": ["noise", 0]}
    if typ in made:
        return made[typ]
    raise NotApplicable(f"needs a {typ} input ('{name}')")


def branch(node: str, info: dict, side: str, key: str) -> dict | str:
    """The nodes that run `node` on one side's MODEL and save what it gives as a PNG named after `key`; a str
    says why it cannot run. node "" is the bare model (the baseline for each node's effect)."""
    model = MODEL_OF[side]
    nodes, extra = {}, {}
    out_types = info["output"] if node else ["MODEL"]
    if node:
        inputs = {}
        optional = info["input"].get("optional", {})
        # optional MODEL inputs too (LoraSave's model_diff): the node is in the table for taking a MODEL there
        used = OPTIONAL_USED.get(node, []) + [n for n, spec in optional.items() if spec and spec[0] == "MODEL"]
        wanted = {**info["input"].get("required", {}), **{n: optional[n] for n in used}}
        for name, spec in wanted.items():
            try:
                inputs[name] = value_for(name, spec, model, extra, key)
            except NotApplicable as e:
                return str(e)
        nodes[f"{key}_n"] = {"class_type": node, "inputs": inputs}
        nodes.update(extra)
        source = f"{key}_n"
    else:
        source = None

    def out(typ):
        return [source, out_types.index(typ)] if source else model

    latent = None
    if "MODEL" in out_types:
        latent = {"class_type": "KSampler", "inputs": {
            "model": out("MODEL"), "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": SEED, "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    elif "LATENT" in out_types:
        image_from = ("latent", out("LATENT"))
    elif "GUIDER" in out_types:
        nodes[f"{key}_sig"] = sigmas_node(model)
        latent = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": out("GUIDER"), "sampler": ["ks", 0], "sigmas": [f"{key}_sig", 0],
            "latent_image": ["lat", 0]}}
    elif "SIGMAS" in out_types:
        latent = {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": SEED, "cfg": CFG, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["ks", 0], "sigmas": out("SIGMAS"), "latent_image": ["lat", 0]}}
    elif "IMAGE" in out_types:
        image_from = ("image", out("IMAGE"))
    elif info.get("output_node"):
        return nodes                     # runs for its side effect (a file); compared by what it writes
    else:
        return f"returns {', '.join(out_types) or 'nothing'}: nothing here to compare"
    if latent is not None:
        nodes[f"{key}_s"] = latent
        image_from = ("latent", [f"{key}_s", 0])
    if image_from[0] == "latent":
        nodes[f"{key}_d"] = {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": image_from[1],
                                                                             "vae": ["L", 2]}}
        image_from = ("image", [f"{key}_d", 0])
    nodes[f"{key}_v"] = {"class_type": "SaveImage", "inputs": {"images": image_from[1], "filename_prefix": key}}
    return nodes


# ---- running ----

def clean(message: str) -> str:
    """An error without what differs between two runs of it (object addresses, node ids in paths)."""
    message = re.sub(r"0x[0-9a-f]+", "0x..", message.strip())
    return message[:400]


def wait_patiently(server: ComfyServer, prompt_id: str, timeout: float) -> dict:
    """server.wait, riding out /history requests that time out while the server is busy (a 4 GB ModelSave, a
    starved event loop on a loaded machine): only the deadline or a dead server ends the wait."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return server.wait(prompt_id, timeout=max(1.0, deadline - time.monotonic()))
        except (TimeoutError, urllib.error.URLError, ConnectionError):
            if not server.alive() or time.monotonic() >= deadline:
                raise
            time.sleep(2)


def run_branches(server: ComfyServer, branches: dict[str, dict], timeout: float = 3600,
                 store: "Store | None" = None) -> dict[str, dict]:
    """Post every branch in one prompt; a branch that fails validation or execution is recorded and the prompt is
    posted again without it (what ran is cached, so only the rest runs). Returns key -> {"error": text} or
    {"files": [paths]}. With a `store`, each branch's result is kept there as soon as it is known, so a run
    that dies can be resumed without redoing it."""
    common = common_nodes(server)
    results: dict[str, dict] = {}
    pending = dict(branches)
    owner = lambda node_id: node_id.rsplit("_", 1)[0] if "_" in node_id else None   # noqa: E731
    deadline = time.monotonic() + timeout
    while pending:
        prompt = dict(common)
        for nodes in pending.values():
            prompt.update(nodes)
        status, body = server.post_prompt(prompt)
        node_errors = body.get("node_errors") or {}
        for node_id, err in node_errors.items():
            key = owner(node_id)
            if key in results:
                continue                 # a second node of a branch already recorded
            if key not in pending:
                raise RuntimeError(f"a shared node failed validation: {node_id} {json.dumps(err)[:1000]}")
            texts = [f"{e.get('message', '')}: {e.get('details', '')}" for e in err.get("errors", [])]
            results[key] = {"error": clean(f"{err.get('class_type')} (validation) " + "; ".join(texts))}
            pending.pop(key)
        if status != 200:
            if not node_errors:
                raise RuntimeError(f"/prompt answered {status}: {json.dumps(body)[:2000]}")
            continue                     # every output was invalid: all recorded, post the rest (if any)
        entry = wait_patiently(server, body["prompt_id"], timeout=max(60.0, deadline - time.monotonic()))
        for key in list(pending):        # what finished before the prompt stopped
            pngs = sorted(str(p) for p in server.output.glob(f"{key}_*.png"))
            if pngs:
                results[key] = {"files": pngs}
                pending.pop(key)
        if store:
            store.keep(results)
        if entry["status"]["status_str"] == "success":
            break
        failed = next((data for kind, data in entry["status"]["messages"] if kind == "execution_error"), None)
        key = owner(str(failed["node_id"])) if failed else None
        if key not in pending:
            raise RuntimeError(f"the prompt failed outside any branch: {failed}\n{server.log_tail()}")
        results[key] = {"error": clean(f"{failed['node_type']}: {failed['exception_message']}")}
        pending.pop(key)
        print(f"  {key}: {results[key]['error'][:160]}", flush=True)
    for key in branches:
        if key not in results:
            results[key] = {"files": sorted(str(p) for p in server.output.glob(f"{key}_*"))}
    if store:
        store.keep(results)
    return results


class Store:
    """Finished branches of one version's survey, kept under .runtime/cache (PNGs copied, errors as text), named
    by node and side, for one set of settings; output nodes' big files are not kept (those rerun)."""

    def __init__(self, version: str, names: dict[str, str], root: Path = FIXTURES):
        self.dir = root / f"results-{version}-{SIZE}px-{STEPS}step-cfg{CFG:g}-seed{SEED}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = names               # branch key -> "node|side"
        self.index = self.dir / "results.json"
        self.saved = json.loads(self.index.read_text()) if self.index.exists() else {}

    def known(self, key: str) -> dict | None:
        return self.saved.get(self.names[key])

    def keep(self, results: dict[str, dict]) -> None:
        for key, result in results.items():
            name = self.names[key]
            if name in self.saved:
                continue
            if "files" in result:
                if not all(f.endswith(".png") for f in result["files"]) or not result["files"]:
                    continue
                kept = []
                for i, f in enumerate(result["files"]):
                    dst = self.dir / f"{name.replace('|', '__').replace(' ', '_')}_{i}.png"
                    shutil.copyfile(f, dst)
                    kept.append(str(dst))
                result = {"files": kept}
            self.saved[name] = result
        self.index.write_text(json.dumps(self.saved, indent=1))


def load_png(path: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path)).astype(np.int16)


def files_differ(pack: list[str], core: list[str], dtypes: set | None = None,
                 apart: set | None = None) -> float | None:
    """Largest difference between what the two sides wrote (PNG pixels, or safetensors tensors, whose
    (pack, core) dtype pairs go into `dtypes` and the names of those not equal into `apart`); None when the two
    did not write the same set of files."""
    if len(pack) != len(core) or not pack:
        return None
    worst = 0.0
    dtypes = set() if dtypes is None else dtypes
    apart = set() if apart is None else apart
    for a, b in zip(pack, core):
        if a.endswith(".png"):
            x, y = load_png(a), load_png(b)
            if x.shape != y.shape:
                return None
            worst = max(worst, float(np.abs(x - y).max()))
        elif a.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
                if set(fa.keys()) != set(fb.keys()):
                    return None
                for name in fa.keys():
                    ta, tb = fa.get_tensor(name), fb.get_tensor(name)
                    if ta.shape != tb.shape:
                        return None
                    dtypes.add((str(ta.dtype).replace("torch.", ""), str(tb.dtype).replace("torch.", "")))
                    gap = float((ta.float() - tb.float()).abs().max()) if ta.numel() else 0.0
                    if gap > 0:
                        apart.add(name)
                    worst = max(worst, gap)
        else:
            worst = max(worst, 0.0 if Path(a).read_bytes() == Path(b).read_bytes() else float("inf"))
    return worst


def classify(pack: dict, core: dict, baseline: dict) -> dict:
    """The row's result and note for one node from its two runs and the bare model's; `diff` (pack vs core) and
    `effect` (pack vs the bare model) in /255 where images were compared, so a test can ask for an effect."""
    if "error" in pack or "error" in core:
        if pack.get("error") == core.get("error"):
            return {"result": REFUSED, "note": pack["error"]}
        return {"result": DIFFERS, "note": f"pack: {pack.get('error', 'ran')} | core: {core.get('error', 'ran')}"}
    if not pack["files"] and not core["files"]:
        return {"result": SAME, "note": "ran on both; wrote nothing on either"}
    dtypes, apart = set(), set()
    diff = files_differ(pack["files"], core["files"], dtypes, apart)
    if diff is None:
        return {"result": DIFFERS,
                "note": f"outputs do not match: pack {len(pack['files'])} files, core {len(core['files'])}"}
    pngs = pack["files"][0].endswith(".png")
    if diff > (TOLERANCE if pngs else 0):
        where = "" if pngs else f" in {len(apart)} tensor(s): {', '.join(sorted(apart)[:3])}"
        return {"result": DIFFERS, "diff": diff, "apart": sorted(apart),
                "note": f"pack vs core {diff:g}{'/255' if pngs else ' (largest tensor difference)'}{where}"}
    if not pngs:
        mixed = sorted(f"{a} (pack) / {b} (core)" for a, b in dtypes if a != b)
        # core's UNETLoader keeps a bf16 file in fp32 on a CPU, the pack's loader keeps bf16: same values
        return {"result": SAME, "diff": diff,
                "note": f"wrote the same tensor values ({len(pack['files'])} file(s))"
                        + (f"; dtypes differ: {', '.join(mixed)}" if mixed else "")}
    effect = float(np.abs(load_png(pack["files"][0]) - load_png(baseline["files"][0])).max())
    note = f"pack vs core {diff:g}/255; " + (f"changes the image by {effect:g}/255" if effect
                                              else "no change to the image at these settings")
    return {"result": SAME, "note": note, "diff": diff, "effect": effect}


def model_nodes(info: dict) -> dict[str, dict]:
    """Core nodes (not this pack's, not other custom nodes) with a MODEL input or output."""
    out = {}
    for name, node in info.items():
        if str(node.get("python_module", "")).startswith("custom_nodes"):
            continue
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        takes = any(spec[0] == "MODEL" for spec in inputs.values() if isinstance(spec, (list, tuple)) and spec)
        if takes or "MODEL" in node.get("output", []):
            out[name] = {**node, "takes_model": takes}
    return out


def survey(server: ComfyServer, only: list[str] | None = None, resume: bool = False) -> list[dict]:
    """One row per core MODEL node (those in `only`, when given): its result on this server. With `resume`,
    branches a previous run of the same settings finished are taken from its store instead of run again (only
    for the docs run after a crash: a stored result says nothing about the pack's code since)."""
    nodes = model_nodes(server.object_info())
    if only:
        missing = set(only) - set(nodes)
        if missing:
            raise KeyError(f"not MODEL nodes in ComfyUI {server.version}: {sorted(missing)}")
        nodes = {n: nodes[n] for n in only}
    rows, branches, keys = [], {}, {}
    for side in SIDES:
        branches[f"base_{side}"] = branch("", {}, side, f"base_{side}")
    for i, (name, node) in enumerate(sorted(nodes.items())):
        row = {"node": name, "category": node.get("category", ""), "result": NA, "note": ""}
        rows.append(row)
        if not node["takes_model"]:
            row["note"] = "makes a MODEL (from a file or from nothing); takes none to run on"
            continue
        if name in NOT_RUN:
            row["note"] = NOT_RUN[name]
            continue
        made = {side: branch(name, node, side, f"n{i}{side[0]}") for side in SIDES}
        if any(isinstance(m, str) for m in made.values()):
            row["note"] = next(m for m in made.values() if isinstance(m, str))
            continue
        for side in SIDES:
            branches[f"n{i}{side[0]}"] = made[side]
        keys[name] = {side: f"n{i}{side[0]}" for side in SIDES}
    started = time.monotonic()
    print(f"ComfyUI {server.version}: {len(rows)} MODEL nodes, {len(keys)} run on both models "
          f"({len(branches)} branches in one prompt)", flush=True)
    store = Store(server.version, {**{f"base_{side}": f"(bare model)|{side}" for side in SIDES},
                                   **{k[side]: f"{name}|{side}" for name, k in keys.items() for side in SIDES}})
    results = {key: store.known(key) for key in branches if resume and store.known(key)}
    if results:
        print(f"  {len(results)} branches already done (kept in {store.dir})", flush=True)
    results.update(run_branches(server, {k: b for k, b in branches.items() if k not in results}, store=store))
    for side in SIDES:
        if "error" in results[f"base_{side}"]:
            raise RuntimeError(f"the bare {side} model did not sample: {results[f'base_{side}']['error']}")
    base = results["base_pack"]
    plain = files_differ(base["files"], results["base_core"]["files"])
    if plain is None or plain > TOLERANCE:
        raise RuntimeError(f"the bare models differ ({plain}/255): nothing else can be compared")
    for row in rows:
        if row["node"] in keys:
            k = keys[row["node"]]
            row.update(classify(results[k["pack"]], results[k["core"]], base))
            if row["result"] == DIFFERS and row["node"] in KNOWN_CAUSES:
                row["note"] += f" (cause: {KNOWN_CAUSES[row['node']]})"
            elif row["result"] == DIFFERS and row.get("apart") and set(row["apart"]) <= UNREAD_BY_CORE:
                row["note"] += f" (cause: {CAUSE_UNREAD})"
            if row["result"] == DIFFERS:
                print(f"\n!!! {server.version} {row['node']} DIFFERS on the pack's MODEL: {row['note']}\n", flush=True)
    print(f"ComfyUI {server.version}: ran in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def survey_version(version: str, only: list[str] | None = None, fixtures: Path | None = None,
                   resume: bool = False) -> list[dict]:
    fixtures = fixture_files() if fixtures is None else fixtures
    with tempfile.TemporaryDirectory(prefix=f"model-nodes-{version}-") as tmp:
        base = Path(tmp)
        prepare_base(base, fixtures)
        with ComfyServer(version, base) as server:
            try:
                return survey(server, only, resume)
            finally:
                if KEEP_LOG:
                    shutil.copyfile(server.log_path, KEEP_LOG / f"server-{version}.log")


# ---- the table ----

def counts(rows: list[dict]) -> dict[str, int]:
    return {result: sum(r["result"] == result for r in rows) for result in (SAME, DIFFERS, REFUSED, NA)}


def settings() -> dict:
    return {"size": SIZE, "steps": STEPS, "cfg": CFG, "seed": SEED, "tolerance_255": TOLERANCE}


def write_table(by_version: dict[str, list[dict]], md: Path, js: Path) -> None:
    versions = list(by_version)
    merged: dict[str, dict] = {}
    for version, rows in by_version.items():
        for r in rows:
            m = merged.setdefault(r["node"], {"node": r["node"], "category": r["category"], "results": {},
                                              "notes": {}})
            m["results"][version], m["notes"][version] = r["result"], r["note"]
    lines = ["# Core ComfyUI nodes that take or return MODEL, on the pack's MODEL", "",
             "Generated by `scripts/model_node_table.py` from real servers (do not edit by hand). Each core node "
             f"with a MODEL input ran in a tiny job ({SIZE}x{SIZE}, {STEPS} step(s), cfg {CFG:g}, core's KSampler "
             "downstream (SamplerCustom / SamplerCustomAdvanced after a SIGMAS / GUIDER node); "
             "/object_info's defaults for its other inputs) once on the pack's `ZImageTurboLoader` MODEL and once "
             "on core's `UNETLoader` MODEL, both reading the same full-width Z-Image file (dim 3840, two layers, "
             "random weights). *same as core*: PNGs within 1/255 (output nodes: equal tensors in the files "
             "written); *refused by both*: the same error on both models; *not applicable*: the node cannot be "
             "run here (reason given); *DIFFERS*: a bug in the pack.", ""]
    for version in versions:
        c = counts(by_version[version])
        lines.append(f"- **ComfyUI {version}**: {len(by_version[version])} MODEL nodes: "
                     + ", ".join(f"{n} {k}" for k, n in c.items()))
    lines += ["", "| node | category | " + " | ".join(versions) + " | note |",
              "|---|---|" + "---|" * len(versions) + "---|"]
    for name in sorted(merged):
        m = merged[name]
        results = [m["results"].get(v, "absent") for v in versions]
        notes = []
        for v in versions:
            note = m["notes"].get(v)
            if note and note not in [n for _, n in notes]:
                notes.append((v, note))
        text = notes[0][1] if len(notes) == 1 else "; ".join(f"{v}: {n}" for v, n in notes)
        text = text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {m['category']} | " + " | ".join(results) + f" | {text} |")
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    js.write_text(json.dumps({"settings": settings(),
                              "counts": {v: counts(r) for v, r in by_version.items()},
                              "nodes": by_version}, indent=1) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS))
    parser.add_argument("--nodes", nargs="+", help="re-run only these nodes' rows (the others are kept "
                        "from the JSON when its settings match)")
    parser.add_argument("--out", default=str(REPO / "docs" / "model_nodes.md"))
    parser.add_argument("--resume", action="store_true",
                        help="take branches a crashed run of the same settings finished from its store")
    parser.add_argument("--keep-log", help="a folder to copy each server's log into")
    args = parser.parse_args(argv)
    global KEEP_LOG
    KEEP_LOG = Path(args.keep_log) if args.keep_log else None
    started = time.monotonic()
    fixtures = fixture_files()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # versions not surveyed in this run keep their rows from the JSON (same settings only), so each version can
    # be run on its own; the table is written after each version, so a late failure keeps the earlier ones
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    by_version = {v: rows for v, rows in earlier.get("nodes", {}).items() if earlier.get("settings") == settings()}
    for v in args.versions:
        fresh = survey_version(v, args.nodes, fixtures, args.resume)
        if args.nodes and v in by_version:            # --nodes re-runs those rows; the others stay as they were
            redone = {r["node"]: r for r in fresh}
            fresh = [redone.pop(r["node"], r) for r in by_version[v]] + list(redone.values())
        by_version[v] = fresh
        by_version = {k: by_version[k] for k in sorted(by_version, key=lambda k: VERSIONS.index(k)
                                                        if k in VERSIONS else len(VERSIONS))}
        write_table(by_version, out, out.with_suffix(".json"))
    bad = {v: [r["node"] for r in rows if r["result"] == DIFFERS] for v, rows in by_version.items()}
    for v, rows in by_version.items():
        print(f"ComfyUI {v}: {counts(rows)}")
    print(f"wrote {out} and {out.with_suffix('.json')} in {time.monotonic() - started:.0f} s")
    if any(bad.values()):
        print(f"!!! DIFFERS on the pack's MODEL: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
