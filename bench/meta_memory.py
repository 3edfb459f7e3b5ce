"""Device memory without a device: run a model at full size on the meta device (shapes only) and count the
bytes of the tensors it makes while they live. What the GPU's caching allocator adds (kernel workspaces,
rounding, fragmentation) is not counted, so a count is a floor; the GPU benchmark measures the real peak."""
from __future__ import annotations

import collections
import weakref
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors made inside: each storage counted once, until its last tensor dies.
    Tensors made before (weights, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.size, self.refs, self.now, self.peak = {}, collections.Counter(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.size:
                    self.size[key] = t.untyped_storage().nbytes()
                    self.now += self.size[key]
                    self.peak = max(self.peak, self.now)
                self.refs[key] += 1
                weakref.finalize(t, self._drop, key)
        return out

    def _drop(self, key) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.size.pop(key)
            del self.refs[key]


def fused_sdpa(q, k, v, attn_mask=None, **kwargs):
    """Attention as a GPU's fused kernels compute it (flash; memory-efficient with a mask): their meta kernels
    keep no L x L scores, as the math kernel a meta tensor would otherwise get does."""
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    bias = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]


@contextmanager
def gpu_attention():
    """torch.nn.functional.scaled_dot_product_attention as fused_sdpa inside (every caller looks it up there)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def peak_bytes(call: Callable[[], object]) -> int:
    """The counted peak of one call on meta tensors, with GPU attention."""
    mode = LiveBytes()
    with torch.no_grad(), gpu_attention(), mode:
        out = call()
        del out
    return mode.peak


def param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
