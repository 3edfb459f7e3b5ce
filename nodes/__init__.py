"""The pack's ComfyUI nodes. Registered through NODE_CLASS_MAPPINGS only (V1), which ComfyUI 0.3.75 and
0.30.0 both load. Node ids are frozen (saved workflows name them; the "Turbo" in some is historical: every
node runs Z-Image Turbo and Base): inputs may be appended, never renamed. Display names may change."""
from .controlnet import ZImageFunControlnetScheduled
from .image import ZImageTurboSize, ZImageTurboVAEDecode, ZImageTurboVAEEncode
from .inpaint import ZImageInpaintEncode
from .loaders import ZImageTurboCheckpointLoader, ZImageTurboDiffusersLoader, ZImageTurboLoader
from .lora import ZImageLoraLoader
from .sampling import ZImageTurboSampler
from .save import ZImageTurboSaveImage
from .speed import ZImageTurboCompile

NODE_CLASS_MAPPINGS = {
    "ZImageTurboLoader": ZImageTurboLoader,
    "ZImageTurboCheckpointLoader": ZImageTurboCheckpointLoader,
    "ZImageTurboSampler": ZImageTurboSampler,
    "ZImageTurboVAEDecode": ZImageTurboVAEDecode,
    "ZImageTurboSize": ZImageTurboSize,
    "ZImageTurboDiffusersLoader": ZImageTurboDiffusersLoader,
    "ZImageTurboVAEEncode": ZImageTurboVAEEncode,
    "ZImageTurboSaveImage": ZImageTurboSaveImage,
    "ZImageTurboCompile": ZImageTurboCompile,
    "ZImageLoraLoader": ZImageLoraLoader,
    "ZImageFunControlnetScheduled": ZImageFunControlnetScheduled,
    "ZImageInpaintEncode": ZImageInpaintEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageTurboLoader": "Z-Image Loader",
    "ZImageTurboCheckpointLoader": "Z-Image Checkpoint Loader",
    "ZImageTurboSampler": "Z-Image Sampler",
    "ZImageTurboVAEDecode": "Z-Image VAE Decode",
    "ZImageTurboSize": "Z-Image Size",
    "ZImageTurboDiffusersLoader": "Z-Image Diffusers Loader",
    "ZImageTurboVAEEncode": "Z-Image VAE Encode",
    "ZImageTurboSaveImage": "Z-Image Save Image",
    "ZImageTurboCompile": "Z-Image Compile",
    "ZImageLoraLoader": "Z-Image LoRA Loader (any trainer)",
    "ZImageFunControlnetScheduled": "Z-Image Fun ControlNet (start/end)",
    "ZImageInpaintEncode": "Z-Image Inpaint Encode",
}
