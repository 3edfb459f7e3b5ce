"""The GPU benchmark as the lent machine would run it, here: every installed distribution that machine's image
lacks is made unimportable (optional imports then take their fallbacks), the ComfyUI tree is the bundled one,
and bench/gpu.py runs with the arguments given (add --smoke on a CPU); a first argument `comfy_nodes` runs
bench/comfy_nodes.py instead, as bench/device_run.sh does.

    ZIMAGE_COMFYUI_TREE=$PWD/.device/ComfyUI-0.30.0 .runtime/venv/bin/python -m bench.device_check --smoke \\
        --sizes 64 --batches 1 --variants pack pack-plain pack-fp8 --memory

The image's package list is the device tool's (KINDS.md, read 2026-11-17); what scripts/device_bundle.sh
carries is added to it. It prints which imports it blocked."""
from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import runpy
import sys

IMAGE = set("""
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    humanize huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
    opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
    simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
    threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
    torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
    uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
CARRIED = {"comfy-aimdo", "comfy-kitchen", "torchsde", "trampoline"}       # scripts/device_bundle.sh
# this repo (an editable install here, the working tree there), and what only this venv's huggingface_hub
# version needs (the image has its own hub, with its own dependencies)
HERE_ONLY = {"comfyui-zimage-turbo", "httpx2", "httpcore2", "truststore"}


def norm(name: str) -> str:
    return name.replace("_", "-").lower()


class NotOnTheMachine(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.owner = {top: [norm(d) for d in dists] for top, dists in md.packages_distributions().items()}
        self.allowed = IMAGE | CARRIED | HERE_ONLY
        self.blocked: set[str] = set()

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = self.owner.get(top)
        if dists and not any(d in self.allowed or d.startswith("nvidia-") for d in dists):
            self.blocked.add(top)
            raise ImportError(f"{name} is not on the lent machine (bench/device_check.py)")
        return None


def main() -> None:
    finder = NotOnTheMachine()
    sys.meta_path.insert(0, finder)
    args = sys.argv[1:]
    script = "gpu"
    if args[:1] == ["comfy_nodes"]:
        script, args = "comfy_nodes", args[1:]
    sys.argv = [f"bench/{script}.py", *args]
    try:
        runpy.run_module(f"bench.{script}", run_name="__main__", alter_sys=True)
    finally:
        print(f"imports blocked as absent on the lent machine: {sorted(finder.blocked) or 'none'}")


if __name__ == "__main__":
    main()
