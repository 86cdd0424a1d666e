"""The most CPU tensor memory one call holds at once, from torch's allocation events.

A process's peak resident set also counts what the heap keeps after frees and how it fragments,
which moves by tens of MiB between processes of one configuration (SD1.5 guided steps on a 2-vCPU VM:
0.07 GiB over nine processes of ours). Peers that differ by less than that cannot be ranked by it.
This counts tensors instead: the profiler reports every allocation and free of torch's CPU
allocator, in order, so the running sum of the bytes allocated during the call has one maximum,
the same in every process (CUDA's ``max_memory_allocated`` above the level at the call's start is
the counterpart there). Not counted: tensors that were live before the call (the profiler does not
report their frees), and memory that is not a tensor (an op's ``std::vector`` scratch, oneDNN's
buffers).
"""

from __future__ import annotations

from collections.abc import Callable

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

__all__ = ["tensor_peak_bytes"]


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Run ``fn`` once under the profiler; the peak of CPU tensor bytes it allocated and held at once."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda event: event[0])  # stable: events of one instant keep the order recorded
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
