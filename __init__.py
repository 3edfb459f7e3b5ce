"""ComfyUI entry point of the Z-Image-Turbo pack.

The engine (`zimage_core/`) is complete and tested on its own; the ComfyUI nodes that expose it (loader,
sampler, VAE, size) are the next piece of work and will register here through one path only.
Until then ComfyUI loads this folder and finds no nodes in it, which it logs and ignores.
"""
