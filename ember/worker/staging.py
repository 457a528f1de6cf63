"""Host -> device copies of a step's inputs through pinned staging buffers (CUDA), so each copy is one
asynchronous DMA instead of a synchronous copy from pageable memory. On a CPU device it is the identity."""

from __future__ import annotations

import torch


class PinnedStager:
    """One pinned buffer per input name, grown as needed and reused every step."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.is_pinned = self.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}  # name -> flat pinned buffer
        self._copies_done = None  # CUDA event after the last step's copies: buffers are reusable once it ran

    def to_device(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` (host) on the device; on CUDA copied through the pinned buffer for `name` without blocking."""
        if not self.is_pinned:
            return t if t.device == self.device else t.to(self.device)
        if self._copies_done is not None:
            self._copies_done.synchronize()  # the previous step's copies ran long ago; never waits in practice
            self._copies_done = None
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
            buf = self._buffers[name] = torch.empty(max(t.numel(), 256) * 2, dtype=t.dtype).pin_memory()
        view = buf[:t.numel()].view(t.shape)
        view.copy_(t)
        return view.to(self.device, non_blocking=True)

    def mark_step(self) -> None:
        """Record that this step's copies are queued (call once after the last `to_device` of a step)."""
        if self.is_pinned:
            self._copies_done = torch.cuda.Event()
            self._copies_done.record()
