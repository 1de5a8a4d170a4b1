"""Device tensors to host numpy arrays with one synchronisation per batch."""

from __future__ import annotations

import numpy as np
import torch


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """float32 numpy copies of ``tensors``, all of them behind one synchronisation.

    On CUDA each tensor is copied into pinned host memory with ``non_blocking=True`` and the stream is synchronised
    once, after the last copy is queued, so the copies overlap each other and nothing waits tensor by tensor. On the
    CPU this is a plain conversion.
    """
    if not tensors or tensors[0].device.type != "cuda":
        return [t.detach().float().cpu().numpy() for t in tensors]
    hosts = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(t.detach().float(), non_blocking=True)
        hosts.append(host)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [h.numpy() for h in hosts]
