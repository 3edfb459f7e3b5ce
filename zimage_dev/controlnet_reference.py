"""diffusers 0.42.1's Z-Image ControlNet pipelines on the files a ComfyUI server reads, for
tests/test_controlnet_diffusers.py. Run as a module in its own process: the wide DiT and the used part of a Fun
ControlNet are ~4 GB in bf16, and the process ends (freeing them) before the server starts.

Precision: ComfyUI on the CPU keeps these bf16 weights and computes in fp32 (manual cast). Here the big Linear
layers of every block stay bf16 and are cast to fp32 for their own forward only (diffusers' layerwise-casting
hook); everything else (embedders, norms, pad tokens, the timestep MLP) is held in fp32. A bf16 value is exact
in fp32, so both sides multiply the same numbers in the same precision. (The timestep MLP must not be a hooked
bf16 layer: diffusers' TimestepEmbedder casts its sinusoid to that layer's stored dtype, rounding t to bf16.)

Two rules: the trainer's (VideoX-Fun's, which made the released files; what the pack's node computes): diffusers
as it is plus the control refiner's hints on the DiT's own noise refiner (`dit_gets_refiner_hints`); and core's
(`core_tokens`): diffusers with the control stream cut to what ComfyUI's ZImageControlPatch computes on (see
`use_core_token_set`), to tell the difference of token sets from anything else.

Usage: python -m zimage_dev.controlnet_reference JOB.json  (JOB lists the files and the cases; torch.save of the
results goes to JOB["out"]).
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import numpy as np
import torch

BIG_BLOCKS = ("layers.", "noise_refiner.", "context_refiner.", "control_layers.", "control_noise_refiner.")

# ZImageControlNetModel configurations of the released files (the layouts ComfyUI's ModelPatchLoader detects):
# Union 1.0 has six control layers on main blocks 0, 5, ..., 25 and a plain two-block control refiner; "lite"
# (2.1-lite) has three, on 0, 10, 20, a control refiner that feeds the two noise-refiner blocks, and 33 input
# channels (control latent 16 + mask 1 + inpaint latent 16).
LAYOUTS = {
    "union_1.0": dict(control_layers_places=[0, 5, 10, 15, 20, 25], control_in_dim=16, add_control_noise_refiner=None),
    "lite": dict(control_layers_places=[0, 10, 20], control_refiner_layers_places=[0, 1], control_in_dim=33,
                 add_control_noise_refiner="control_noise_refiner"),
}


# ---- files ---------------------------------------------------------------------------------------------------------

def core_to_release(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Fun ControlNet state dict in ComfyUI's module names (fused qkv, q_norm/k_norm, out) -> the released
    file's names, which are diffusers' (to_q/to_k/to_v, norm_q/norm_k, to_out.0). The inverse of what core's
    z_image_convert does on load."""
    out = {}
    for key, value in sd.items():
        if key.endswith(".attention.qkv.weight"):
            stem = key[: -len("qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{stem}{name}.weight"] = part
            continue
        key = (key.replace(".attention.q_norm.", ".attention.norm_q.")
               .replace(".attention.k_norm.", ".attention.norm_k.")
               .replace(".attention.out.", ".attention.to_out.0."))
        out[key] = value
    return out


def release_weights(layout: str, seed: int) -> dict[str, torch.Tensor]:
    """Random bf16 weights with the released file's names and shapes for `layout` (std 0.02, norm weights around
    1, as zimage_dev/wide_files.py's Union 1.0 fixture)."""
    from diffusers import ZImageControlNetModel
    from zimage_dev.parity import released_like
    with torch.device("meta"):
        model = ZImageControlNetModel(**LAYOUTS[layout])
    return released_like(model, seed)


def write_release_file(path: Path, layout: str, seed: int = 23) -> None:
    from safetensors.torch import save_file
    sd = release_weights(layout, seed)
    save_file(sd, str(path))
    del sd
    gc.collect()


# ---- models --------------------------------------------------------------------------------------------------------

def fp32_compute(model: torch.nn.Module) -> torch.nn.Module:
    """bf16 storage for the blocks' Linear layers (fp32 only during their forward), fp32 for the rest."""
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(BIG_BLOCKS):
            apply_layerwise_casting_hook(module, torch.bfloat16, torch.float32, non_blocking=False)
            continue
        for pname, p in module.named_parameters(recurse=False):
            setattr(module, pname, torch.nn.Parameter(p.data.float(), requires_grad=False))
    return model.eval().requires_grad_(False)


def load_assigned(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    model.load_state_dict(sd, strict=True, assign=True)          # strict: a key the map misses fails here
    return fp32_compute(model)


def wide_transformer(path: Path, cap_feat_dim: int):
    """The wide DiT file (ComfyUI layout) as diffusers' ZImageTransformer2DModel, through diffusers' own
    single-file conversion."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file
    sd = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(path)))
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    with torch.device("meta"):
        model = ZImageTransformer2DModel(dim=3840, n_layers=n_layers, n_refiner_layers=2, n_heads=30, n_kv_heads=30,
                                         cap_feat_dim=cap_feat_dim, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    return load_assigned(model, sd)


def controlnet(path: Path, layout: str, core_layout: bool, n_layers: int):
    """The ControlNet file as diffusers' ZImageControlNetModel, built only with the control layers whose hints land
    on a main block the DiT has (0 for a two-block DiT): the others' hints are never added, and no control layer
    depends on a later one, so leaving them out changes no number and saves 2 GB and most of the time."""
    from diffusers import ZImageControlNetModel
    from safetensors import safe_open
    config = dict(LAYOUTS[layout])
    places = [p for p in config["control_layers_places"] if p < n_layers]
    config["control_layers_places"] = places
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()
              if not (k.startswith("control_layers.") and int(k.split(".")[1]) >= len(places))}
    if core_layout:
        sd = core_to_release(sd)
    with torch.device("meta"):
        model = ZImageControlNetModel(**config)
    return load_assigned(model, sd)


# ---- what ComfyUI's control patch computes on ----------------------------------------------------------------------

def use_core_token_set(pipe, n_img: int) -> list:
    """Hooks that make diffusers' control run on ComfyUI's tokens (core comfy_extras/nodes_model_patch.py,
    ZImageControlPatch, and comfy/ldm/lumina/controlnet.py, 0.30.0); everything else stays diffusers':
    - the control blocks (refiner and layers) attend to the n_img real image tokens only: core hands them
      img_input[:, :n_img], without the caption and without the padding to 32; diffusers (as VideoX-Fun, which
      trained the released files) runs the control layers over the padded image tokens and the caption;
    - the hints are added to the real image tokens only: core adds to img[:, :n_img]; diffusers adds them to the
      whole unified sequence, caption and padding included;
    - (refiner layouts) the control refiner's hints are added to the DiT's own noise-refiner output, as core's
      noise_refiner patch (and VideoX-Fun) do; diffusers 0.42.1 adds them only to the ControlNet's private copy
      of the image stream that feeds its control layers, never to the DiT's.
    Returns the hook handles."""
    cn, dit = pipe.controlnet, pipe.transformer
    handles = []

    def image_keys_only(position):
        def hook(module, args):
            mask = args[position].clone()
            mask[:, n_img:] = False
            return args[:position] + (mask,) + args[position + 1:]
        return hook

    for layer in cn.control_layers:
        handles.append(layer.register_forward_pre_hook(image_keys_only(2)))
    if cn.control_noise_refiner is not None:
        refiner_is_control = cn.add_control_noise_refiner == "control_noise_refiner"
        for layer in cn.control_noise_refiner:
            handles.append(layer.register_forward_pre_hook(image_keys_only(2 if refiner_is_control else 1)))

    def image_rows_only(module, args, kwargs, out):
        result = {}
        for k, v in out.items():
            v = v.clone()
            v[..., n_img:, :] = 0
            result[k] = v
        return result
    handles.append(cn.register_forward_hook(image_rows_only, with_kwargs=True))

    if cn.add_control_noise_refiner == "control_noise_refiner":
        state = {"skips": None, "in_dit": False, "scale": 1.0}

        def image_rows_of_skips(module, args, out):
            # a control refiner block returns stack([skip_0, ..., skip_i, c]): the skips (its hints) keep the
            # image rows only, as core adds them; the ControlNet's own copy of the image stream then gets them
            # as core's DiT does
            out = out.clone()
            out[:-1, :, n_img:] = 0
            state["skips"] = out[:-1]
            return out
        for layer in cn.control_noise_refiner:
            handles.append(layer.register_forward_hook(image_rows_of_skips))

        def scale_of(module, args, kwargs):
            state["scale"] = kwargs.get("conditioning_scale", 1.0)
        handles.append(cn.register_forward_pre_hook(scale_of, with_kwargs=True))

        def dit_on(module, args):
            state["in_dit"] = True

        def dit_off(module, args, out):
            state["in_dit"] = False
        handles.append(dit.register_forward_pre_hook(dit_on))
        handles.append(dit.register_forward_hook(dit_off))

        for i, place in enumerate(cn.control_refiner_layers_places):
            def add_hint(module, args, out, i=i):
                if not state["in_dit"]:                # the ControlNet's own rerun of the refiner adds them itself
                    return out
                return out + state["skips"][i] * state["scale"]
            handles.append(dit.noise_refiner[place].register_forward_hook(add_hint))
    return handles


def dit_gets_refiner_hints(cn, dit) -> list:
    """The trainer's (VideoX-Fun's) refiner hints on diffusers: the 2.x / lite control refiner's hints (scaled) are
    added to the DiT's own noise-refiner output after its blocks 0 and 1, as VideoX-Fun's
    ZImageControlTransformer2DModel does; diffusers 0.42.1 adds them only to the ControlNet's private copy of the
    image stream. The hints are the skips the refiner stage's last block returns the first time it runs in a
    ControlNet forward (2.0 runs all control layers there; they run again, over the caption too, later).
    Returns the hook handles (none for Union 1.0, which has no refiner hints)."""
    mode = cn.add_control_noise_refiner
    if mode is None:
        return []
    last = (cn.control_layers if mode == "control_layers" else cn.control_noise_refiner)[-1]
    state = {"hints": None, "in_dit": False, "scale": 1.0}

    def start(module, args, kwargs):
        state["hints"], state["scale"] = None, kwargs.get("conditioning_scale", 1.0)

    def keep_first(module, args, out):
        if state["hints"] is None:
            state["hints"] = out[:-1]

    def dit_on(module, args):
        state["in_dit"] = True

    def dit_off(module, args, out):
        state["in_dit"] = False
    handles = [cn.register_forward_pre_hook(start, with_kwargs=True), last.register_forward_hook(keep_first),
               dit.register_forward_pre_hook(dit_on), dit.register_forward_hook(dit_off)]
    for i, place in enumerate(cn.control_refiner_layers_places):
        def add_hint(module, args, out, i=i):
            if not state["in_dit"]:               # the ControlNet's own rerun of the shared refiner adds them itself
                return out
            return out + state["hints"][i] * state["scale"]
        handles.append(dit.noise_refiner[place].register_forward_hook(add_hint))
    return handles


def only_on_steps(pipe, steps: set[int]) -> list:
    """control_guidance_start/end as diffusers' Z-Image pipelines lack them: the ControlNet's hints are zeroed on
    the steps outside `steps` (the DiT then adds nothing, as without the ControlNet)."""
    counter = {"step": -1}

    def count(module, args, kwargs):
        counter["step"] += 1

    def gate(module, args, kwargs, out):
        if counter["step"] in steps:
            return out
        return {k: v * 0 for k, v in out.items()}
    return [pipe.controlnet.register_forward_pre_hook(count, with_kwargs=True),
            pipe.controlnet.register_forward_hook(gate, with_kwargs=True)]


# ---- a run ---------------------------------------------------------------------------------------------------------

def decode(vae, latents) -> np.ndarray:
    """diffusers' decode of model-space latents, quantised as ComfyUI's SaveImage does."""
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].movedim(0, -1).numpy()
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


def run_case(pipe, case: dict) -> dict:
    print(f"diffusers: {case['name']}", file=sys.stderr, flush=True)
    from PIL import Image
    h, w = case["height"], case["width"]
    noise = torch.randn(1, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(case["seed"]))
    handles = []
    if case.get("core_tokens"):
        # real image tokens: (h/16) * (w/16), the rest of the 32-multiple is padding
        handles += use_core_token_set(pipe, (h // 16) * (w // 16))
    else:                                         # the trainer's rule: diffusers + the refiner hints on the DiT
        handles += dit_gets_refiner_hints(pipe.controlnet, pipe.transformer)
    if case.get("steps_on") is not None:
        handles += only_on_steps(pipe, set(case["steps_on"]))
    kwargs = dict(height=h, width=w, num_inference_steps=case["steps"], guidance_scale=0.0, latents=noise,
                  control_image=Image.open(case["control"]).convert("RGB"),
                  controlnet_conditioning_scale=case["strength"], output_type="latent")
    if case.get("inpaint"):
        kwargs.update(image=Image.open(case["inpaint"]).convert("RGB"), mask_image=Image.open(case["mask"]))
    try:
        with torch.no_grad():
            latent = pipe(case["prompt"], **kwargs).images
    finally:
        for handle in handles:
            handle.remove()
    return {"latent": latent.float(), "png": decode(pipe.vae, latent)}


def main(job_path: str) -> None:
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline, ZImagePipeline
    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job.get("threads", 2))
    tiny = ZImagePipeline.from_pretrained(job["tiny_folder"])
    parts = {k: v for k, v in tiny.components.items() if k != "transformer"}
    del tiny
    dit = wide_transformer(Path(job["dit"]), parts["text_encoder"].config.hidden_size)
    results = {}
    for case in [c for c in job["cases"] if c["layout"] is None]:         # no ControlNet: ZImagePipeline
        pipe = ZImagePipeline(transformer=dit, **parts)
        noise = torch.randn(1, 16, case["height"] // 8, case["width"] // 8,
                            generator=torch.Generator().manual_seed(case["seed"]))
        with torch.no_grad():
            latent = pipe(case["prompt"], height=case["height"], width=case["width"], guidance_scale=0.0,
                          num_inference_steps=case["steps"], latents=noise, output_type="latent").images
        results[case["name"]] = {"latent": latent.float(), "png": decode(pipe.vae, latent)}
    for layout, spec in job["controls"].items():
        cases = [c for c in job["cases"] if c["layout"] == layout]
        if not cases:
            continue
        cn = controlnet(Path(spec["path"]), layout, spec["core_layout"], len(dit.layers))
        for case in cases:
            cls = ZImageControlNetInpaintPipeline if case.get("inpaint") else ZImageControlNetPipeline
            # the pipeline shares the DiT's embedders with the ControlNet (from_transformer), no copy
            pipe = cls(transformer=dit, controlnet=cn, **parts)
            results[case["name"]] = run_case(pipe, case)
            del pipe
        del cn
        gc.collect()
    torch.save(results, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
