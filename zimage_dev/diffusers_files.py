"""The diffusers reference on tiny random weights: a ZImagePipeline folder saved by diffusers itself, and the same
weights in ComfyUI's layouts, so the pack's loaders, core's and diffusers all run one model."""
from __future__ import annotations

from pathlib import Path

import torch

from zimage_dev.parity import randomize
from zimage_dev.runtime import tokenizer_dir

# Qwen3's chat template renders one user turn with enable_thinking=True as exactly this; ComfyUI's tokenizer
# copy carries Qwen2.5-VL's template (which adds a system turn), so the reference gets Qwen3's behaviour here.
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_diffusers_folder(folder: Path):
    """A tiny random diffusers ZImagePipeline saved by diffusers itself (sharded transformer, index json,
    text_encoder/, vae/, tokenizer/, scheduler/). Returns the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
    from zimage_dev.synthetic import TINY_TEXT

    torch.manual_seed(0)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir())
    tokenizer.chat_template = QWEN3_TEMPLATE
    te_cfg = Qwen3Config(vocab_size=TINY_TEXT.vocab_size, hidden_size=TINY_TEXT.hidden, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=1024)
    text_encoder = randomize(Qwen3Model(te_cfg), seed=1, std=0.2).eval()
    transformer = randomize(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, cap_feat_dim=TINY_TEXT.hidden, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512]),
        seed=2).eval()
    vae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
        shift_factor=0.1159), seed=3, std=0.05).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(folder, max_shard_size="100KB")       # shards + index json, as the release has
    return pipe


SAME_AS_DIFFUSERS = "zt_from_diffusers"


def write_split_from_diffusers(folder, models):
    """The diffusers folder's weights in ComfyUI's layouts (split files and an all-in-one checkpoint), so every
    loader reads the same model the diffusers reference runs."""
    from safetensors.torch import save_file
    from zimage_dev import synthetic
    from zimage_core.loading import prepare_dit, prepare_text_encoder, prepare_vae
    parts = []
    for prepare in (prepare_dit, prepare_text_encoder, prepare_vae):
        meta, _, read = prepare(folder)
        parts.append({k: read(k).contiguous() for k in meta.state_dict()})
    for sub, sd in zip(("diffusion_models", "text_encoders", "vae"), parts):
        (models / sub).mkdir(parents=True, exist_ok=True)
        save_file(sd, str(models / sub / f"{SAME_AS_DIFFUSERS}.safetensors"))
    synthetic.write_all_in_one(models / "checkpoints" / f"{SAME_AS_DIFFUSERS}.safetensors", *parts)
