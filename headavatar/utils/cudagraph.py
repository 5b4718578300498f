"""Replay a tensor function from CUDA graphs, one graph per input signature.

Rendering an avatar at batch 1 launches a few hundred small kernels (head
model, MLP, Gaussian assembly) whose launch cost exceeds their run time; one
graph replay removes it.  Only functions without host synchronisation and
with shape-stable outputs can be captured.  When capture fails, that
signature is run eagerly from then on (the function stays correct, only
slower).  Outputs of a replay live in the graph's static memory and are
overwritten by the next call with the same signature: consume or clone them
first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from headavatar.log import get_logger

_log = get_logger(__name__)


def _flatten(obj: Any, out: list) -> Any:
    """Nested dicts/tuples/lists/dataclasses (e.g. FrameParams) of tensors -> structure spec, appending tensors to ``out``."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return ("T", tuple(obj.shape), obj.dtype)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("C", type(obj), tuple((f.name, _flatten(getattr(obj, f.name), out)) for f in dataclasses.fields(obj)))
    if isinstance(obj, dict):
        return ("D", tuple((k, _flatten(obj[k], out)) for k in sorted(obj)))
    if isinstance(obj, (tuple, list)):
        return ("L", tuple(_flatten(v, out) for v in obj))
    return ("V", obj)


def _one_cuda_device(flat: list[torch.Tensor]) -> bool:
    """All tensors on one CUDA device (a graph records one device's stream)."""
    return bool(flat) and flat[0].device.type == "cuda" and all(t.device == flat[0].device for t in flat)


def _rebuild(spec: Any, it) -> Any:
    kind = spec[0]
    if kind == "T":
        return next(it)
    if kind == "D":
        return {k: _rebuild(s, it) for k, s in spec[1]}
    if kind == "C":
        return spec[1](**{k: _rebuild(s, it) for k, s in spec[2]})
    if kind == "L":
        return tuple(_rebuild(s, it) for s in spec[1])
    return spec[1]


def _on_side_stream(fn: Callable, args, times: int = 1):
    """``fn(*args)`` ``times`` times on a side stream (what must precede a capture), ordered with the current one."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return out


def _record(fn: Callable, spec, flat: list[torch.Tensor], warmup: int):
    """(graph, static inputs, static outputs) of ``fn`` on copies of ``flat``, after ``warmup`` eager
    calls on them; raises what the capture raised (a host synchronisation, an uncapturable op)."""
    static_in = [t.detach().clone() for t in flat]
    static_args = _rebuild(spec, iter(static_in))
    if warmup:
        _on_side_stream(fn, static_args, warmup)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a loader's pin-memory thread may allocate while this thread captures
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = fn(*static_args)
    return graph, static_in, static_out


def _replay(entry: tuple, flat: list[torch.Tensor]):
    graph, static_in, static_out = entry
    for dst, src in zip(static_in, flat):
        dst.copy_(src, non_blocking=True)
    graph.replay()
    return static_out


class CudaGraphed:
    """``CudaGraphed(fn)(*args)`` == ``fn(*args)`` for CUDA tensor arguments, replayed from a graph.

    Arguments may be nested dicts/tuples/lists/dataclasses of tensors and plain values
    (plain values are part of the signature).  Use under ``torch.no_grad()``:
    the graph records no autograd state.
    """

    def __init__(self, fn: Callable, max_graphs: int = 8, warmup: int = 2):
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self._graphs: dict[Any, tuple] = {}
        self._eager: set = set()

    def __call__(self, *args):
        flat: list[torch.Tensor] = []
        spec = _flatten(args, flat)
        if (not _one_cuda_device(flat) or torch.is_grad_enabled()
                or spec in self._eager or (spec not in self._graphs and len(self._graphs) >= self.max_graphs)):
            return self.fn(*args)
        with torch.cuda.device(flat[0].device):  # capture and replay on the tensors' device (cuda:1 ...)
            return self._graphed(spec, flat, args)

    def _graphed(self, spec, flat: list[torch.Tensor], args):
        entry = self._graphs.get(spec)
        if entry is None:
            try:
                entry = self._graphs[spec] = _record(self.fn, spec, flat, self.warmup)
            except Exception:  # a host sync or an uncapturable op inside fn: run it eagerly
                torch.cuda.synchronize()
                self._eager.add(spec)
                return self.fn(*args)
        return _replay(entry, flat)


class GraphedStep:
    """A whole training step (forward, loss, backward, optimiser update) replayed from a CUDA graph.

    ``fn(*args)`` does the entire step on its arguments and returns tensors; it must set the
    gradients to None itself before the backward (so the graph owns them) and use a capturable
    optimiser.  Per signature (tensor shapes plus plain values, e.g. the active SH degree or the
    learning rates, which the fused Adam bakes in), the first ``warmup`` calls run eagerly on a side
    stream and the next one is captured and replayed: every call is a real step.  A signature whose
    capture fails runs eagerly from then on.  At most ``max_graphs`` graphs are kept (each holds a
    step's activations): the least recently used one is dropped.  Outputs are overwritten by the
    next replay of their graph.  Anything that replaces the optimiser's state or the parameters'
    storage (loading a checkpoint) makes the graphs stale: call ``clear()``.
    """

    def __init__(self, fn: Callable, warmup: int = 2, max_graphs: int = 2):
        self.fn, self.warmup, self.max_graphs = fn, warmup, max_graphs
        self._graphs: dict[Any, tuple] = {}
        self._seen: dict[Any, int] = {}
        self._eager: set = set()
        self.captures = 0  # how many graphs were recorded (reported by the trainer)

    def clear(self) -> None:
        self._graphs.clear()
        self._seen.clear()

    def __call__(self, *args):
        flat: list[torch.Tensor] = []
        spec = _flatten(args, flat)
        if not _one_cuda_device(flat) or spec in self._eager:
            return self.fn(*args)
        with torch.cuda.device(flat[0].device):  # streams, capture and replay on the tensors' device
            return self._step(spec, flat, args)

    def _step(self, spec, flat: list[torch.Tensor], args):
        entry = self._graphs.pop(spec, None)
        if entry is None:
            n = self._seen[spec] = self._seen.get(spec, 0) + 1
            if n <= self.warmup:  # warm-up calls are real steps, on the real arguments
                return _on_side_stream(self.fn, args)
            while len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            try:
                entry = _record(self.fn, spec, flat, warmup=0)
            except Exception as e:  # a host synchronisation inside the step: this signature stays eager
                torch.cuda.synchronize()
                _log.info(f"a training step could not be recorded as a CUDA graph, it runs eagerly "
                          f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
                self._eager.add(spec)
                return self.fn(*args)
            if not self.captures:
                _log.info("training steps replay from CUDA graphs (cuda_graph_step)")
            self.captures += 1
        self._graphs[spec] = entry  # (re-)inserted last: the dict's order is the recency order
        return _replay(entry, flat)
