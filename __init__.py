"""ComfyUI entry point of the Z-Image-Turbo pack.

Inside ComfyUI this registers the nodes (V1 mappings, one registration path only). Outside it (tests, tools)
the folder stays importable: the engine in zimage_core/ never imports ComfyUI.
"""
try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
