"""CPU offload for smaller GPUs (issue 9): model-level offload, layerwise DiT offload with
prefetch, and peak-memory reporting.

Model-level (``--enable-cpu-offload``)::

    off = ModelOffloader("cuda")
    off.register("text_encoder", text_encoder)      # nn.Module, or an object with ``.model``
    off.register("dit", dit); off.register("vae", vae)
    with off.use("text_encoder"):                    # only this component is on the GPU
        ctx = text_encoder.encode(prompts)
    off.release("text_encoder")                      # not needed again: host + device freed
    with off.use("dit"): ...                         # the others go back to pinned host memory

A component's tensors (parameters and buffers) are packed once into one host buffer (pinned
when CUDA is available). Onload = per-tensor non-blocking H2D copies (per-tensor device memory,
so the allocator can fit it around fragmentation); offload = pointing the tensors back at the
host copy, which is free because **weights are treated as read-only while registered**
(``register(..., writeback=True)`` copies device values back on offload instead). With
``device="cpu"`` (tests) the "device" copy is a clone of the host copy.

Layerwise (``--enable-layerwise-offload``)::

    lw = enable_layerwise_offload(dit, "cuda")       # before torch.compile; eager blocks only

Each block's parameters/buffers are packed into ONE pinned host byte buffer (every tensor at a
256-byte aligned offset; so a block copy is one H2D memcpy). The GPU holds two slot buffers of
the largest block's size. A forward pre-hook on block i makes the compute stream wait on the copy
event of block i, points the block's tensors at views of its slot and launches the copy of block
i+1 (block 0 after the last block: the prefetch for the next step) into the other slot on a side
stream, after waiting (device-side) on that slot's "free" event. The forward hook records the
slot's free event on the compute stream and points the block's tensors back at empty
placeholders. No host synchronisation on the hot path. Non-block modules stay resident. On a
machine without CUDA the same bookkeeping runs with synchronous copies between two CPU buffers
(tests). ``lw.disable()`` restores the blocks (to their original device) and removes the hooks.
Host buffers are page-locked with ``cudaHostRegister`` (exact size; see ``_HostPack``). Do not
call ``model.to(...)`` while enabled; compile inside blocks only (the hooks swap ``.data``).

Combining both: register the layerwise-offloaded DiT with the ModelOffloader; it then moves only
the non-block tensors and calls ``lw.evict()`` (frees the two GPU slots) when the DiT is offloaded.

``peak_memory_summary()`` -> "peak GPU memory 23.4 GiB" for the run summary.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

__all__ = ["ModelOffloader", "LayerwiseOffloader", "enable_layerwise_offload",
           "peak_memory_summary", "reset_peak_memory"]

_ALIGN = 256  # bytes; every packed tensor starts at a multiple of this


# ----------------------------------------------------------------------------- helpers
def _as_device(device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _want_pin(device: torch.device, pin_memory: Optional[bool]) -> bool:
    """Pinned host memory only when CUDA exists (and, by default, only for a CUDA target)."""
    if not torch.cuda.is_available():
        return False
    return device.type == "cuda" if pin_memory is None else bool(pin_memory)


def _module_of(obj) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    m = getattr(obj, "model", None)
    if isinstance(m, nn.Module):
        return m
    raise TypeError(f"cannot offload {type(obj).__name__}: pass an nn.Module or an object with "
                    "an nn.Module `.model` attribute")


def _unique_tensors(module: nn.Module, skip_modules: Sequence[nn.Module] = ()) -> List[torch.Tensor]:
    """Parameters and buffers of ``module`` (deduplicated; tied weights once), in a stable order,
    excluding the subtrees rooted at ``skip_modules``."""
    skip = {id(m) for root in skip_modules for m in root.modules()}
    seen: Set[int] = set()
    out: List[torch.Tensor] = []
    for m in module.modules():
        if id(m) in skip:
            continue
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def reset_peak_memory(device=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_summary(device=None, reserved: bool = False) -> str:
    """``"peak GPU memory 23.4 GiB"`` (``torch.cuda.max_memory_allocated``; add the reserved
    peak with ``reserved=True``); ``"peak GPU memory n/a (no CUDA)"`` on CPU."""
    if not torch.cuda.is_available():
        return "peak GPU memory n/a (no CUDA)"
    s = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    if reserved:
        s += f" (reserved {torch.cuda.max_memory_reserved(device) / 2**30:.1f} GiB)"
    return s


# ----------------------------------------------------------------------------- model level
class _Component:
    def __init__(self, name, obj, module, tensors, hosts, resident, writeback, layerwise, pack):
        self.name = name
        self.obj = obj
        self.module = module
        self.tensors: List[torch.Tensor] = tensors
        self.hosts: List[torch.Tensor] = hosts
        self.resident = resident
        self.writeback = writeback
        self.layerwise: Optional["LayerwiseOffloader"] = layerwise
        self.pack: "_HostPack" = pack
        self.on_device = False


class ModelOffloader:
    """Whole components live on ``device`` only while their stage runs (see module docstring)."""

    def __init__(self, device, pin_memory: Optional[bool] = None, empty_cache: bool = False):
        self.device = _as_device(device)
        self.pin = _want_pin(self.device, pin_memory)
        self.empty_cache = empty_cache
        self._components: Dict[str, _Component] = {}
        self._released: Set[str] = set()

    # ------------------------------------------------------------------ registry
    def register(self, name: str, obj, *, resident: bool = False, writeback: bool = False):
        """Take over ``obj`` (nn.Module or an object with ``.model``); it starts offloaded
        (``resident=True``: kept on the device for good). Returns ``obj``."""
        if name in self._components:
            raise ValueError(f"component {name!r} is already registered")
        module = _module_of(obj)
        lw = getattr(module, "_s2v_layerwise", None)
        skip = [lw.blocks] if lw is not None else []
        tensors = _unique_tensors(module, skip)
        pack = _HostPack(tensors, self.pin)
        hosts = pack.views(pack.host)
        for t, h in zip(tensors, hosts):
            t.data = h  # offloaded state (frees the original storage)
        c = _Component(name, obj, module, tensors, hosts, resident, writeback, lw, pack)
        self._components[name] = c
        self._released.discard(name)
        if lw is not None:
            lw.evict()
        if resident:
            self.onload(name)
        return obj

    def __contains__(self, name: str) -> bool:
        return name in self._components

    @property
    def names(self) -> List[str]:
        return list(self._components)

    @property
    def on_device(self) -> Set[str]:
        return {n for n, c in self._components.items() if c.on_device}

    def _get(self, name: str) -> _Component:
        if name in self._released:
            raise RuntimeError(f"component {name!r} was released by the offloader; it cannot run "
                               "again (load it again or do not release it)")
        try:
            return self._components[name]
        except KeyError:
            raise KeyError(f"component {name!r} is not registered (have {self.names})") from None

    # ------------------------------------------------------------------ moves
    def onload(self, name: str):
        c = self._get(name)
        if not c.on_device:
            nb = self.pin
            same = self.device.type == "cpu"  # host == device (CPU tests): still a distinct copy
            for t, h in zip(c.tensors, c.hosts):
                t.data = h.clone() if same else h.to(self.device, non_blocking=nb)
            c.on_device = True
        return c.obj

    def offload(self, name: str) -> None:
        c = self._get(name)
        if not c.on_device or c.resident:
            return
        if c.layerwise is not None:
            c.layerwise.evict()
        for t, h in zip(c.tensors, c.hosts):
            if c.writeback and t.data_ptr() != h.data_ptr():
                h.copy_(t.detach())  # synchronous D2H into the host copy
            t.data = h
        c.on_device = False
        if self.empty_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def use(self, name: str, exclusive: bool = True) -> Iterator:
        """Put ``name`` on the device (by default offloading every other non-resident component
        first, so only one stage's weights occupy the GPU). The component stays on the device
        after the block; the next ``use`` of another component moves it back."""
        self._get(name)
        if exclusive:
            for other, c in self._components.items():
                if other != name and c.on_device and not c.resident:
                    self.offload(other)
        yield self.onload(name)

    def offload_all(self) -> None:
        for name, c in self._components.items():
            if not c.resident:
                self.offload(name)

    def release(self, name: str) -> None:
        """Free a component that will not run again: device and host memory are dropped (its
        tensors become empty; calling it afterwards fails)."""
        c = self._get(name)
        if c.layerwise is not None:
            c.layerwise.disable(device="meta")
        for t in c.tensors:
            t.data = torch.empty(0, dtype=t.dtype, device="cpu")
        c.hosts = []
        c.pack.free()
        del self._components[name]
        self._released.add(name)
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unregister(self, name: str, device=None) -> None:
        """Stop managing ``name``, leaving it on ``device`` (default: where it is now)."""
        c = self._get(name)
        dev = torch.device(device) if device is not None else None
        for t, h in zip(c.tensors, c.hosts):
            on_host = t.data_ptr() == h.data_ptr()
            if dev is not None and (t.device != dev or on_host):
                t.data = h.clone() if dev.type == "cpu" and on_host else t.data.to(dev)
            elif on_host:
                t.data = h.clone()  # own storage, so the shared host pack can be freed
        if c.layerwise is not None:
            c.layerwise.evict()
        c.pack.free()
        del self._components[name]


# ----------------------------------------------------------------------------- layerwise
class _HostPack:
    """Tensors packed into ONE host byte buffer, each at a 256-byte aligned offset.

    Pinned packs are page-locked with ``cudaHostRegister`` on an ordinary allocation: the
    caching pinned allocator behind ``pin_memory=True`` rounds every request up to a power of
    two (a 703 MB block would take 1 GiB of locked RAM). Falls back to ``pin_memory=True``.
    """

    def __init__(self, tensors: List[torch.Tensor], pin: bool):
        self.tensors = tensors
        self.orig_devices = [t.device for t in tensors]
        self.meta = [(t.dtype, tuple(t.shape)) for t in tensors]
        self.layout: List[Tuple[int, int]] = []  # (byte offset, nbytes)
        off = 0
        for t in tensors:
            nb = t.numel() * t.element_size()
            self.layout.append((off, nb))
            off += (nb + _ALIGN - 1) // _ALIGN * _ALIGN
        self.nbytes = max(off, _ALIGN)
        self.host, self._registered = _alloc_host(self.nbytes, pin)
        # A registered buffer must be unregistered before its memory goes back to the OS: a later
        # allocation at the same address then fails to pin ("resource already mapped"). So the
        # buffer's last reference is held by a finalizer that unregisters it, run by free() or
        # when the pack is collected (a pipeline or offloader dropped without free()).
        self._unlock = weakref.finalize(self, _unregister, self.host) if self._registered else None
        for t, view in zip(tensors, self.views(self.host)):
            view.copy_(t.detach())

    def views(self, buf: torch.Tensor) -> List[torch.Tensor]:
        return [buf[o:o + n].view(dt).view(shape)
                for (dt, shape), (o, n) in zip(self.meta, self.layout)]

    @property
    def pinned(self) -> bool:
        return self._registered or (self.host is not None and torch.cuda.is_available()
                                    and self.host.is_pinned())

    def free(self) -> None:
        """Unlock (after a device sync: no copy may still read it) and drop the host buffer."""
        if self._unlock is not None:
            self._unlock()
            self._unlock = None
        self._registered = False
        self.host = None


def _unregister(buf: torch.Tensor) -> None:
    """Undo ``cudaHostRegister`` on ``buf`` once no copy may still read it."""
    try:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
    except Exception:  # pragma: no cover - best effort (interpreter shutdown)
        pass


USE_HOST_REGISTER = True  # page-lock with cudaHostRegister (exact size) instead of pin_memory
_PIN_FALLBACK_MAX = 2 ** 30  # larger buffers stay pageable if cudaHostRegister fails (2x waste)


# Below this size use the caching pinned allocator: small CPU allocations come from the heap and
# can share a page with an earlier registered buffer, and registering a page twice fails
# (cudaErrorHostMemoryAlreadyRegistered). Large ones are mmapped (pages of their own); there the
# allocator's power-of-two rounding would waste up to 2x, so they are registered exactly.
_REGISTER_MIN = 64 * 2 ** 20


def _page_locked(nbytes: int) -> Optional[torch.Tensor]:
    """An ordinary host buffer page-locked with ``cudaHostRegister``, or None if that fails."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
    try:
        rt = torch.cuda.cudart()
        err = rt.cudaHostRegister(buf.data_ptr(), nbytes, 0)
    except Exception:  # pragma: no cover - binding missing: use the pinned allocator
        return None
    if int(getattr(err, "value", err)) == 0:
        return buf
    clear = getattr(rt, "cudaGetLastError", None)  # a failed call leaves the error set
    if clear is not None:
        clear()
    return None


def _alloc_host(nbytes: int, pin: bool) -> Tuple[torch.Tensor, bool]:
    """-> (uint8 host buffer, registered-with-cudaHostRegister)."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu"), False
    if USE_HOST_REGISTER and nbytes >= _REGISTER_MIN:
        buf = _page_locked(nbytes)
        if buf is not None:
            return buf, True
    if nbytes > _PIN_FALLBACK_MAX:
        warnings.warn(f"offload: cannot page-lock {nbytes / 2**30:.1f} GiB with cudaHostRegister; "
                      "using pageable host memory (copies will not overlap compute)")
        return torch.empty(nbytes, dtype=torch.uint8, device="cpu"), False
    return torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True), False


class LayerwiseOffloader:
    """Blocks of ``getattr(model, blocks_attr)`` in (pinned) host memory, double-buffered on the
    device with a prefetch of the next block on a side stream (see module docstring).

    ``stats``: ``loads`` (copies issued), ``hits`` (block found already prefetched), ``misses``
    (block copied on demand, e.g. the very first block). ``resident_blocks``: blocks whose
    weights are in a device slot; ``bound_blocks``: blocks whose parameters point at a slot.
    """

    num_slots = 2

    def __init__(self, model: nn.Module, device, blocks_attr: str = "blocks",
                 pin_memory: Optional[bool] = None, prefetch: bool = True):
        if getattr(model, "_s2v_layerwise", None) is not None:
            raise RuntimeError("layerwise offload is already enabled on this model")
        blocks = getattr(model, blocks_attr, None)
        if blocks is None or len(blocks) == 0:
            raise ValueError(f"model has no non-empty `{blocks_attr}` to offload layerwise")
        self.model = model
        self.blocks = blocks
        self.device = _as_device(device)
        self.pin = _want_pin(self.device, pin_memory)
        self.prefetch = prefetch
        self._cuda = self.device.type == "cuda"
        self.stats = {"loads": 0, "hits": 0, "misses": 0}

        self._placeholders: Dict[torch.dtype, torch.Tensor] = {}
        # 1. pack every block into one host buffer; its tensors become empty placeholders
        #    (tensors shared with non-block modules stay resident)
        outside = _unique_tensors(model, [blocks])
        claimed: Set[int] = {id(t) for t in outside}
        self._packed: List[_HostPack] = []
        for i, blk in enumerate(blocks):
            ts = [t for t in _unique_tensors(blk) if id(t) not in claimed]
            claimed.update(id(t) for t in ts)
            pb = _HostPack(ts, self.pin)
            self._packed.append(pb)
            for t in ts:
                t.data = self._placeholder(t.dtype)
        # 2. everything else resident on the device
        for t in outside:
            if t.device != self.device:
                t.data = t.data.to(self.device)
        # 3. device slots, streams, events
        self._slot_bytes = max(pb.nbytes for pb in self._packed)
        self._slots: List[Optional[torch.Tensor]] = [None] * self.num_slots
        self._slot_block: List[Optional[int]] = [None] * self.num_slots
        self._block_slot: Dict[int, int] = {}
        self._bound: Set[int] = set()
        self._last_slot: Optional[int] = None
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)
            self._load_ev = [torch.cuda.Event() for _ in range(self.num_slots)]
            self._free_ev = [torch.cuda.Event() for _ in range(self.num_slots)]
        # 4. hooks
        self._handles = []
        for i, blk in enumerate(blocks):
            self._handles.append(blk.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(blk.register_forward_hook(self._make_post(i)))
        model._s2v_layerwise = self
        # the declared fact a block runner reads (s2v_fast.fast): weights arrive per block, in
        # the hooks or through before_block / after_block when a runner calls no module
        model.block_streamer = self

    # ------------------------------------------------------------------ introspection
    @property
    def num_blocks(self) -> int:
        return len(self._packed)

    @property
    def block_bytes(self) -> int:
        return self._slot_bytes

    @property
    def resident_blocks(self) -> Set[int]:
        return set(self._block_slot)

    @property
    def bound_blocks(self) -> Set[int]:
        return set(self._bound)

    def managed_tensors(self) -> List[torch.Tensor]:
        return [t for pb in self._packed for t in pb.tensors]

    # ------------------------------------------------------------------ internals
    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        ph = self._placeholders.get(dtype)
        if ph is None:
            ph = self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return ph

    def _slot(self, s: int) -> Tuple[torch.Tensor, bool]:
        """-> (slot buffer, freshly allocated). Slots are allocated on the compute stream."""
        if self._slots[s] is None:
            self._slots[s] = torch.empty(self._slot_bytes, dtype=torch.uint8, device=self.device)
            return self._slots[s], True
        return self._slots[s], False

    def _load(self, b: int, avoid: Optional[int]) -> int:
        """Issue the copy of block ``b`` into a slot other than ``avoid`` (and not bound)."""
        cands = [s for s in range(self.num_slots)
                 if s != avoid and (self._slot_block[s] is None or self._slot_block[s] not in self._bound)]
        if not cands:
            raise RuntimeError("layerwise offload: no free slot (nested block calls are unsupported)")
        empty = [s for s in cands if self._slot_block[s] is None]
        s = empty[0] if empty else cands[0]
        old = self._slot_block[s]
        if old is not None:
            del self._block_slot[old]
        pb = self._packed[b]
        buf, fresh = self._slot(s)
        dst = buf[:pb.nbytes]
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._stream):
                if fresh:  # the allocator may hand out memory still read by queued compute work
                    self._stream.wait_stream(compute)
                self._stream.wait_event(self._free_ev[s])  # slot's previous user has finished
                dst.copy_(pb.host, non_blocking=True)
                self._load_ev[s].record(self._stream)
        else:
            dst.copy_(pb.host)
        self._slot_block[s] = b
        self._block_slot[b] = s
        self.stats["loads"] += 1
        return s

    def _bind(self, b: int, s: int) -> None:
        pb = self._packed[b]
        for t, v in zip(pb.tensors, pb.views(self._slots[s])):  # slot s holds block b
            t.data = v
        self._bound.add(b)

    def _unbind(self, b: int) -> None:
        for t in self._packed[b].tensors:
            t.data = self._placeholder(t.dtype)
        self._bound.discard(b)

    def _mark_free(self, s: int) -> None:
        if self._cuda:
            self._free_ev[s].record(torch.cuda.current_stream(self.device))

    def _pre(self, i: int) -> None:
        for b in list(self._bound):  # left bound by an exception inside a block
            if b != i:
                self._mark_free(self._block_slot[b])
                self._unbind(b)
        s = self._block_slot.get(i)
        if s is None:
            s = self._load(i, avoid=None)
            self.stats["misses"] += 1
        elif i not in self._bound:
            self.stats["hits"] += 1
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._load_ev[s])
        self._bind(i, s)
        self._last_slot = s
        nxt = (i + 1) % self.num_blocks
        if self.prefetch and nxt != i and nxt not in self._block_slot:
            self._load(nxt, avoid=s)

    def _post(self, i: int) -> None:
        s = self._block_slot.get(i)
        if s is not None:
            self._mark_free(s)
        self._unbind(i)

    def before_block(self, i: int) -> None:
        """Block i's weights on the device (what its forward pre-hook does)."""
        self._pre(i)

    def after_block(self, i: int) -> None:
        """Block i is done with its weights (its forward hook)."""
        self._post(i)

    def _make_pre(self, i: int):
        def hook(module, args):
            self._pre(i)
        return hook

    def _make_post(self, i: int):
        def hook(module, args, output):
            self._post(i)
        return hook

    # ------------------------------------------------------------------ public control
    def _quiesce(self) -> None:
        """Order the compute stream after every issued copy, so freeing slots is safe."""
        if self._cuda:
            cur = torch.cuda.current_stream(self.device)
            for s in range(self.num_slots):
                if self._slot_block[s] is not None:
                    cur.wait_event(self._load_ev[s])

    def evict(self, free_slots: bool = True) -> None:
        """Drop every block from the device (and, by default, free the two slot buffers); the
        next forward reloads block 0 on demand."""
        self._quiesce()
        for b in list(self._bound):
            self._unbind(b)
        self._block_slot.clear()
        self._slot_block = [None] * self.num_slots
        if free_slots:
            self._slots = [None] * self.num_slots

    def disable(self, device=None) -> None:
        """Remove the hooks and give every block tensor its own storage again, on ``device``
        (default: where it was before offloading; "meta" drops the weights)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.evict()
        for pb in self._packed:
            for t, v, d in zip(pb.tensors, pb.views(pb.host), pb.orig_devices):
                dev = torch.device(device) if device is not None else d
                if dev.type == "meta":  # drop the weights (ModelOffloader.release)
                    t.data = torch.empty(0, dtype=t.dtype, device="cpu")
                elif dev.type == "cpu":
                    t.data = v.clone()
                else:
                    t.data = v.to(dev)
            pb.free()
        self._packed = []
        if getattr(self.model, "_s2v_layerwise", None) is self:
            del self.model._s2v_layerwise
        if getattr(self.model, "block_streamer", None) is self:
            self.model.block_streamer = None

    remove = disable


def enable_layerwise_offload(model: nn.Module, device, blocks_attr: str = "blocks",
                             pin_memory: Optional[bool] = None, prefetch: bool = True
                             ) -> LayerwiseOffloader:
    """Layerwise-offload ``model``'s blocks to host memory (see :class:`LayerwiseOffloader`)."""
    return LayerwiseOffloader(model, device, blocks_attr=blocks_attr, pin_memory=pin_memory,
                              prefetch=prefetch)
