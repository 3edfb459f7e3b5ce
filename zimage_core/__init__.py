"""Z-Image-Turbo engine in plain PyTorch. Never imports ComfyUI."""
