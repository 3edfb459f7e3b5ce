"""Z-Image (Turbo and Base) in plain PyTorch: the strict file reader the nodes use, and a reference engine.
Never imports ComfyUI."""
