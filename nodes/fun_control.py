"""The Fun ControlNet run as its trainer ran it (aigc-apps/VideoX-Fun, `ZImageControlTransformer2DModel`, which
made the released Union 1.0 / 2.0 / 2.1 / lite files), as a model patch on core's NextDiT.

What the trainer does, and core's ZImageControlPatch does not:
- the control blocks attend over the control tokens *and the DiT's refined caption tokens* (with RoPE for both),
  and block 0 injects the whole input sequence (caption and image), not the image tokens alone;
- each hint covers the whole sequence: it is added to the caption tokens and to the image padding too;
- the control tokens are padded to the DiT's multiple of 32 with the DiT's own image pad token;
- a missing control or inpaint image is a zero latent (core encodes a grey image).
Shared with core: the refiner stage (2.x / lite hints added to the DiT's noise-refiner image tokens; 2.0 running
all control layers there, as it was trained), the layer places, the strength on every hint, the inpaint channels.

The control weights are core's own `ZImage_Control` (from Load Model Patch); this module only decides which
tokens its blocks see and where their hints go, through the noise_refiner and double_block patch hooks. Its state
lives for one forward: the first noise-refiner call starts it, the last hint ends it."""
from __future__ import annotations

import torch

# the DiT block after which each control layer's hint is added, by the number of control layers the file has
# (VideoX-Fun's config/z_image/*.yaml: Union 1.0, 2.0 / 2.1, 2.1-lite)
PLACES = {6: (0, 5, 10, 15, 20, 25), 15: tuple(range(0, 30, 2)), 3: (0, 10, 20)}
REFINER_PLACES = (0, 1)                      # 2.x / lite: hints after the DiT's two noise-refiner blocks
PATCH_SIZE = 2


def control_places(control) -> tuple[int, ...]:
    n = len(control.control_layers)
    if n not in PLACES:
        raise ValueError(f"model_patch: a Fun ControlNet with {n} control layers is none of the released layouts "
                         "(Union 1.0: 6, 2.x: 15, lite: 3): load a released Z-Image Fun ControlNet file")
    return PLACES[n]


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] in the DiT's token order (row-major patches, then pH, pW, C)."""
    b, c, h, w = latent.shape
    p = PATCH_SIZE
    return latent.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)


def caption_rope(rope_embedder, length: int, like: torch.Tensor) -> torch.Tensor:
    """The RoPE core's DiT gives its (padded) caption: positions 1..length on the first axis, 0 on the others."""
    ids = torch.zeros(1, length, 3, dtype=torch.float32, device=like.device)
    ids[:, :, 0] = torch.arange(length, dtype=torch.float32, device=like.device) + 1.0
    return rope_embedder(ids).movedim(1, 2).to(like.dtype)


class TrainerControlPatch:
    """Core's noise_refiner and double_block patch hooks, driving core's ZImage_Control blocks by VideoX-Fun's rule.

    `condition(x)` returns the control latent ([b, 16 or 33, H, W], the DiT's padded latent size) for the DiT's
    input `x`; the node's ControlInputs encodes the images, a test may pass its own."""

    def __init__(self, model_patch, rope_embedder, condition, strength: float):
        self.model_patch, self.rope_embedder = model_patch, rope_embedder
        self.condition, self.strength = condition, strength
        self.places = control_places(model_patch.model)
        self.state = None

    @property
    def control(self):
        return self.model_patch.model

    def __call__(self, kwargs: dict) -> dict:
        if kwargs.get("block_type") == "noise_refiner":
            return self.refiner_block(kwargs)
        return self.main_block(kwargs)

    # ---- the noise refiner: control tokens on the image positions only -------------------------------------------

    def refiner_block(self, kw: dict) -> dict:
        control, img_input, pe, vec = self.control, kw["img_input"], kw["pe"], kw["vec"]
        if kw["block_index"] == 0:
            self.state = {"c": self.control_tokens(kw), "txt": kw["txt"], "next": 0}
            if not control.refiner_control:          # Union 1.0: two plain blocks, no hints
                for layer in control.control_noise_refiner:
                    self.state["c"] = layer(self.state["c"], None, pe, vec)
        if not control.refiner_control or kw["block_index"] not in REFINER_PLACES or self.state is None:
            return {}
        # core's block runner: 2.1 / lite use control_noise_refiner; 2.0 (`broken`) runs control layer 0, then
        # layers 1..14 keeping layer 1's hint, as the trainer did
        skip, self.state["c"] = control.forward_noise_refiner_block(kw["block_index"], self.state["c"], img_input,
                                                                   None, pe, vec)
        return {"img": kw["img"] + skip * self.strength}

    def control_tokens(self, kw: dict) -> torch.Tensor:
        """The control latent embedded, then padded as the DiT pads its image tokens (with its own pad token,
        read from the padding rows of the DiT's embedded input)."""
        x, img_input = kw["x"], kw["img_input"]
        latent = self.condition(x).to(device=img_input.device, dtype=img_input.dtype)
        embedder = self.control.control_all_x_embedder[f"{PATCH_SIZE}-1"]
        tokens = embedder(patchify(latent))
        if tokens.shape[0] != img_input.shape[0]:
            tokens = tokens.repeat(img_input.shape[0] // tokens.shape[0], 1, 1)
        n_img = tokens.shape[1]
        return torch.cat([tokens, img_input[:, n_img:]], dim=1)

    # ---- the main blocks: control tokens and the caption, hints on everything --------------------------------------

    def main_block(self, kw: dict) -> dict:
        block = kw["block_index"]
        if block not in self.places:
            return {}
        if self.state is None:
            raise RuntimeError("Z-Image Fun ControlNet: the DiT ran no noise refiner before its main blocks, so the "
                               "control has no caption to attend to: this ComfyUI's Z-Image model is not one the "
                               "pack knows; report it with your ComfyUI version")
        txt, img = kw["txt"], kw["img"]
        state, k = self.state, self.places.index(block)
        if "txt" in state and state["txt"].shape[1] != txt.shape[1]:
            raise RuntimeError(f"Z-Image Fun ControlNet: the DiT's sequence holds {txt.shape[1]} tokens before the "
                               f"image where its caption has {state['txt'].shape[1]} (reference images?): the Fun "
                               "ControlNet was trained on caption + image only")
        skip = None
        while state["next"] <= k:
            j = state["next"]
            if j == 0:
                # block 0 sees the DiT's whole input: [caption, image] in core's order (RoPE carries position)
                cap = state.pop("txt")
                state["x"] = torch.cat([cap, kw["img_input"]], dim=1)
                state["pe"] = torch.cat([caption_rope(self.rope_embedder, cap.shape[1], kw["pe"]), kw["pe"]], dim=1)
                state["c"] = torch.cat([cap, state["c"]], dim=1)
                state["cap_len"] = cap.shape[1]
            skip, state["c"] = self.control.control_layers[j](state["c"], state["x"], x_mask=None,
                                                              freqs_cis=state["pe"], adaln_input=kw["vec"])
            state["next"] += 1
        if k == len(self.places) - 1:
            self.state = None                    # the last hint: free the control stream
        hint = skip * self.strength
        n = state["cap_len"]
        return {"img": img + hint[:, n:], "txt": txt + hint[:, :n]}

    # ---- ComfyUI moves patches with the model and loads their weights -----------------------------------------------

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, torch.device):
            self.state = None
            if hasattr(self.condition, "to"):
                self.condition.to(device_or_dtype)
        return self

    def models(self):
        return [self.model_patch]


class ControlInputs:
    """The control latent, as VideoX-Fun's pipeline builds it: the control image's latent, and for the 2.x / lite
    layouts (33 channels) the mask of kept pixels and the latent of the image to keep (its masked area grey). An
    absent image is a zero latent, an absent mask a zero channel. Encoded once at the image's size; again (with
    the VAE swapped in, as core does) only when the sampled latent has another size."""

    def __init__(self, vae, image, inpaint_image, mask, inpaint_channels: bool):
        self.vae, self.image, self.inpaint_image = vae, image, inpaint_image
        self.scale = vae.spacial_compression_encode()             # pixels per latent cell: 8
        self.keep = None if mask is None else 1.0 - mask.reshape(-1, 1, *mask.shape[-2:]).float()
        self.inpaint_channels = inpaint_channels
        self.cached = None
        known = image if image is not None else inpaint_image
        if known is not None:
            self.cached = self.encode(known.shape[1], known.shape[2])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2] * self.scale, x.shape[-1] * self.scale
        if self.cached is None or self.cached.shape[-2:] != x.shape[-2:]:
            if self.image is None and self.inpaint_image is None:
                self.cached = self.encode(height, width)
            else:
                import comfy.model_management as mm
                loaded = mm.loaded_models(only_currently_used=True)
                self.cached = self.encode(height, width)
                mm.load_models_gpu(loaded)
        return self.cached

    def encode(self, height: int, width: int) -> torch.Tensor:
        lh, lw = height // self.scale, width // self.scale
        parts = [self.latent(self.image, height, width)]
        if self.inpaint_channels:
            parts.append(self.mask_channel(lh, lw))
            parts.append(self.latent(self.inpaint_image, height, width, keep=self.keep))
        batch = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(batch, *p.shape[1:]) if p.shape[0] == 1 else p for p in parts], dim=1)

    def latent(self, image, height: int, width: int, keep=None) -> torch.Tensor:
        if image is None:
            return torch.zeros(1, 16, height // self.scale, width // self.scale)
        import comfy.latent_formats
        import comfy.utils
        image = image[..., :3]
        if image.shape[1:3] != (height, width):
            image = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "area", "center").movedim(1, -1)
        if keep is not None:                     # the area to repaint becomes grey, as in training
            keep_px = comfy.utils.common_upscale(keep, width, height, "bilinear", "center").round()
            image = (image - 0.5) * keep_px.movedim(1, -1) + 0.5
        return comfy.latent_formats.Flux().process_in(self.vae.encode(image)).float()

    def mask_channel(self, lh: int, lw: int) -> torch.Tensor:
        if self.keep is None:
            return torch.zeros(1, 1, lh, lw)
        import comfy.utils
        return comfy.utils.common_upscale(self.keep, lw, lh, "nearest", "center")

    def to(self, device):
        if self.cached is not None:
            self.cached = self.cached.to(device)
