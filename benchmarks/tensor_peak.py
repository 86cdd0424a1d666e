"""The most CPU tensor memory a step holds at once, from torch's allocation events.

A process's peak resident set also counts what the heap keeps after frees and how it fragments,
which moves by tens of MiB between processes of one configuration (SD1.5 fp32 guided steps on a
2-vCPU VM: 0.07 GiB over nine processes of ours). Peers that differ by less than that cannot be
ranked by it. This counts tensors instead: under the profiler, torch's CPU allocator reports every
allocation and free, in order, so the running sum of live bytes has one maximum, the same in every
process. The step runs twice in one profiling session and the second is measured: what the first left to
it (e.g. maps kept for the next step) counts until it is freed, blocks older than the session do
not (their frees are matched by address and ignored). Not
counted: tensors older than the step before (weights, inputs), and memory that is not a tensor (an
op's ``std::vector`` scratch, oneDNN's buffers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch._C._profiler import _ExtraFields_Allocation, _ProfilerEvent
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["tensor_peak_bytes"]

_MEASURED = "tensor_peak.measured_call"


def _flatten(events: Iterable[_ProfilerEvent]) -> list[_ProfilerEvent]:
    out: list[_ProfilerEvent] = []
    for event in events:
        out.append(event)
        out += _flatten(event.children)
    return out


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Call ``fn`` twice under the profiler: the most CPU tensor bytes live during the second call,
    counting those the first left to it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function(_MEASURED):
            fn()
    events = _flatten(prof.profiler.kineto_results.experimental_event_tree())
    start = min(event.start_time_ns for event in events if event.name == _MEASURED)
    allocations = [
        (event.start_time_ns, event.extra_fields)
        for event in events
        if isinstance(event.extra_fields, _ExtraFields_Allocation) and event.extra_fields.device.type == "cpu"
    ]
    allocations.sort(key=lambda item: item[0])  # stable: events of one instant keep the tree's order
    # Blocks allocated in this session, by address: a free of an older block is not this step's
    # (the profiler reports it where an earlier session allocated it).
    blocks: dict[int, int] = {}
    live = 0
    peak = None
    for time_ns, allocation in allocations:
        if time_ns >= start and peak is None:
            peak = live  # what the first call left to the second
        if allocation.alloc_size > 0:
            blocks[allocation.ptr] = allocation.alloc_size
            live += allocation.alloc_size
        elif allocation.ptr in blocks:
            live -= blocks.pop(allocation.ptr)
        if peak is not None:
            peak = max(peak, live)
    return live if peak is None else peak
