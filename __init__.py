"""ComfyUI entry point of the Z-Image pack (Turbo and Base).

Inside ComfyUI this registers the nodes (V1 mappings, one registration path only) and serves the canvas
extension in js/. Outside it (tests, tools) the folder stays importable: the engine in zimage_core/ never
imports ComfyUI.
"""
try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# ComfyUI serves this folder at /extensions/<pack>/ and the frontend imports every .js file in it.
WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
