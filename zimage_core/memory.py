"""The memory policy of the plain pipeline: which part lives where, and how a 1024² job fits a small GPU.

    keep     every part resident on the device (fastest; about 20.5 GB in bf16)
    swap     the 8 GB text encoder stays in CPU memory: while it encodes, its layers visit the device one at a
             time (streamed, one ahead), its token embedding is looked up on the CPU. The DiT and VAE stay
             resident and the VAE decodes in tiles, so the device holds the 12.3 GB DiT plus ~0.5 GB at most
             (bench/memory_estimate.py: 12.9 GB at 1024² in bf16, 6.9 GB with fp8 blocks)
    lowvram  swap, plus the DiT's blocks streamed the same way: what stays on the device is one or two blocks,
             the embedders, the VAE and the activations (1.4 GB predicted at 1024²)

(Inside ComfyUI its own model management does this for the pack's MODEL/CLIP/VAE, --lowvram included.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

POLICIES = ("keep", "swap", "lowvram")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"memory policy must be one of {', '.join(POLICIES)}, got '{policy}'")
    return policy


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- pinned memory in few large pieces -------------------------------------------------------------------

# torch's pinned-memory allocator (CachingHostAllocator) rounds every request up to a power of two. Pinned
# tensor by tensor, the DiT's blocks took 18.3 GiB for 11.4 GiB of weights, the text encoder's layers 9.3 for
# 6.6. So the streamer asks for chunks whose sizes already are powers of two and packs the tensors into them.
ARENA_CHUNK = 1 << 28          # 256 MiB: ~3 of the largest block tensors (qkv, 88 MB in bf16) per chunk
ARENA_ALIGN = 256              # every tensor starts on a 256-byte boundary: any dtype can view it, DMA likes it


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _round_up_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ArenaPlan:
    """Where each tensor of a BlockStreamer lives: chunk sizes (powers of two: what the pinned allocator
    really takes) and, per tensor in the order given, its (chunk, byte offset)."""
    chunks: tuple[int, ...]
    places: tuple[tuple[int, int], ...]

    @property
    def bytes(self) -> int:
        return sum(self.chunks)


def plan_arena(sizes: list[int], chunk: int = ARENA_CHUNK, align: int = ARENA_ALIGN) -> ArenaPlan:
    """Pack tensors of `sizes` bytes into power-of-two chunks: largest first, each into the first chunk with
    room (first-fit decreasing), chunks of `chunk` bytes (or the largest tensor's power of two if larger);
    then every chunk shrunk to the least power of two that holds what it got, which trims the last, part-full
    one. Pure arithmetic: tests plan full-size models on the meta device."""
    need = [_round_up_to(n, align) for n in sizes]
    size = max([chunk, *(_pow2_ceil(n) for n in need)])
    used: list[int] = []
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -need[i]):
        k = next((k for k, u in enumerate(used) if u + need[i] <= size), None)
        if k is None:
            k = len(used)
            used.append(0)
        places[i] = (k, used[k])
        used[k] += need[i]
    return ArenaPlan(tuple(min(size, _pow2_ceil(max(u, 1))) for u in used), tuple(places))


# ---- blocks streamed from CPU memory (the DiT's and the text encoder's) ------------------------------

class BlockStreamer:
    """Keep each block's weights in (pinned) CPU memory and give them to the device only while the block runs.

    A forward pre-hook puts the block's weights on the device (already copied if it was prefetched) and starts
    copying the next block's on a side stream, so the copy overlaps this block's compute; a forward hook
    drops the device copy. At most two blocks' weights are on the device at once.

    The CPU copies are views into a few power-of-two chunks (plan_arena), pinned where the device is CUDA:
    page-locked memory is then the weights plus well under 10% (tests/test_memory.py), not the 1.6x that
    pinning each tensor cost. On other devices the chunks are plain memory, laid out the same way."""

    def __init__(self, blocks: list[nn.Module], device: torch.device | str):
        self.blocks, self.device = list(blocks), torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.home: list[dict[str, Tensor]] = [{} for _ in self.blocks]
        self.ready: dict[int, tuple[dict[str, Tensor], object]] = {}
        self.next_of: dict[int, int] = {}               # block -> the block that ran after it last time
        self._last: int | None = None
        self.loads = 0                                  # device copies made (a test reads it)
        self.resident_max = 0                           # most blocks on the device at once
        self.weight_bytes = 0                           # bytes of the streamed tensors
        self.arena: list[Tensor] = []                   # the chunks their CPU copies live in
        self._handles = []
        self._move_home()
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda m, a, i=i: self._enter(i)))
            self._handles.append(block.register_forward_hook(lambda m, a, o, i=i: self._leave(i)))

    @property
    def pinned_bytes(self) -> int:
        """Page-locked bytes this streamer holds (0 off CUDA, where nothing is pinned)."""
        return sum(c.numel() for c in self.arena) if self.cuda else 0

    @staticmethod
    def _tensors(block: nn.Module):
        yield from block.named_parameters()
        yield from block.named_buffers()

    @staticmethod
    def plan(blocks: list[nn.Module]) -> ArenaPlan:
        """The chunks a streamer of these blocks asks for (works on meta modules: nothing is allocated)."""
        return plan_arena([t.nbytes for block in blocks for _, t in BlockStreamer._tensors(block)])

    def _move_home(self) -> None:
        """Copy every block tensor into its place in the arena and point the module at it there. One chunk
        at a time, each original dropped as soon as it is copied: the extra memory while this runs is about
        one chunk, not a second copy of the weights."""
        items = [(i, name, t) for i, block in enumerate(self.blocks) for name, t in self._tensors(block)]
        plan = self.plan(self.blocks)
        by_chunk: list[list[int]] = [[] for _ in plan.chunks]
        for j, (k, _) in enumerate(plan.places):
            by_chunk[k].append(j)
        for k, size in enumerate(plan.chunks):
            chunk = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            for j in by_chunk[k]:
                i, name, t = items[j]
                offset = plan.places[j][1]
                home = chunk[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
                home.copy_(t.detach())
                t.data = home
                self.home[i][name] = home
                self.weight_bytes += t.nbytes
            self.arena.append(chunk)
        items.clear()

    @staticmethod
    def _point(block: nn.Module, tensors: dict[str, Tensor]) -> None:
        for name, t in BlockStreamer._tensors(block):
            t.data = tensors[name]

    def _copy(self, i: int) -> tuple[dict[str, Tensor], object]:
        self.loads += 1
        if not self.cuda:
            return {name: t.to(self.device) for name, t in self.home[i].items()}, None
        with torch.cuda.stream(self.stream):
            copies = {name: t.to(self.device, non_blocking=True) for name, t in self.home[i].items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        return copies, done

    def _enter(self, i: int) -> None:
        copies, done = self.ready.pop(i, None) or self._copy(i)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            for t in copies.values():                  # made on the side stream, used on this one
                t.record_stream(torch.cuda.current_stream(self.device))
        self._point(self.blocks[i], copies)
        if self._last is not None:
            self.next_of[self._last] = i                # learn the order the model really runs them in
        self._last = i
        nxt = self.next_of.get(i, (i + 1) % len(self.blocks))
        self.ready = {k: v for k, v in self.ready.items() if k == nxt}     # drop a prefetch that was not used
        if nxt != i and nxt not in self.ready:
            self.ready[nxt] = self._copy(nxt)
        self.resident_max = max(self.resident_max, 1 + len(self.ready))

    def _leave(self, i: int) -> None:
        self._point(self.blocks[i], self.home[i])

    def close(self) -> None:
        """Remove the hooks; the weights stay in CPU memory (move the model to put them back)."""
        for h in self._handles:
            h.remove()
        self.ready.clear()
        # The modules hold their weights' views; the streamer lets go of its own, so a chunk is freed (unpinned)
        # once no weight lives in it, e.g. after the model is moved, whoever still holds this streamer.
        self.arena.clear()
        self.home = [{} for _ in self.blocks]


def stream_dit_blocks(dit: nn.Module, device: torch.device | str) -> BlockStreamer:
    """Low-VRAM DiT: everything but the transformer blocks on `device`, the blocks streamed by a BlockStreamer.
    The blocks run in order (noise refiner, context refiner, main layers), so 'the next block' is in that
    order; a block entered out of turn is simply copied on demand."""
    device = torch.device(device)
    blocks = [*dit.noise_refiner, *dit.context_refiner, *dit.layers]
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    for p in dit.parameters():
        if id(p) not in block_ids:
            p.data = p.data.to(device)
    return BlockStreamer(blocks, device)


def stream_text_encoder(encoder: nn.Module, device: torch.device | str) -> BlockStreamer:
    """Low-memory text encoder: it stays in CPU memory and the decoder layers it runs (all but the last: the
    caption feature is that layer's input) are streamed by a BlockStreamer. The token embedding (0.8 GB at
    Qwen3-4B) is looked up where it is, on the CPU; only the looked-up rows travel."""
    return BlockStreamer(list(encoder.model.layers[:-1]), device)


# ---- the VAE decoding in tiles ------------------------------------------------------------------------

def _ramp(n: int, overlap: int, at_start: bool, at_end: bool, device) -> Tensor:
    """Blend weights along one side of a tile: rising over `overlap` pixels where a neighbour overlaps."""
    w = torch.ones(n, device=device)
    ramp = (torch.arange(overlap, device=device) + 0.5) / overlap
    if not at_start and overlap:
        w[:overlap] = ramp
    if not at_end and overlap:
        w[-overlap:] = ramp.flip(0)
    return w


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(n)})


def decode_tiled(decode, z: Tensor, tile: int = 64, overlap: int = 16, scale: int = 8) -> Tensor:
    """decode(z) computed tile by tile over the latent (tile and overlap in latent pixels), the tiles blended
    with linear ramps where they overlap. Peak memory is that of one tile's decode. The result is close to,
    not equal to, one whole decode: the decoder's GroupNorms and mid-block attention see one tile at a time
    (a larger overlap makes the seams softer). A latent no larger than one tile is decoded whole."""
    B, C, H, W = z.shape
    if H <= tile and W <= tile:
        return decode(z)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got {overlap} for tile {tile}")
    out = weight = None
    for y in _starts(H, tile, overlap):
        for x in _starts(W, tile, overlap):
            part = decode(z[:, :, y:y + tile, x:x + tile]).float()
            if out is None:
                out = torch.zeros(B, part.shape[1], H * scale, W * scale, device=part.device)
                weight = torch.zeros(1, 1, H * scale, W * scale, device=part.device)
            h, w = part.shape[-2:]
            wy = _ramp(h, overlap * scale, y == 0, y + tile >= H, part.device)
            wx = _ramp(w, overlap * scale, x == 0, x + tile >= W, part.device)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += part * mask
            weight[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += mask
    return out / weight
