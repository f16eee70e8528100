"""Replay a fixed-shape GPU computation as one CUDA graph."""

from __future__ import annotations

from typing import Callable

import torch


class CudaGraphed:
    """Calls `function(x)` on a CUDA tensor as one CUDA graph replay; other devices call it directly.

    The first call for an input shape and dtype warms `function` up (a torch.compile'd function
    compiles then) and captures it; later calls copy `x` into the captured input, replay on the
    current stream, and return a copy of the output (the captured output is reused by the next
    replay). Worth it for encoders of fixed input size, whose many small kernels would otherwise each
    cost a CPU launch. `function` must be a pure function of `x` under torch.no_grad.
    """

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], warmup_calls: int = 2) -> None:
        self.function = function
        self.warmup_calls = warmup_calls
        self._captured: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.function(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._captured:
            self._captured[key] = self._capture(x)
        static_input, static_output, graph = self._captured[key]
        static_input.copy_(x)
        graph.replay()
        return static_output.clone()

    def _capture(self, x: torch.Tensor):
        static_input = x.clone()
        current = torch.cuda.current_stream(x.device)
        warmup_stream = torch.cuda.Stream(x.device)
        warmup_stream.wait_stream(current)
        with torch.cuda.stream(warmup_stream):
            for _ in range(self.warmup_calls):
                self.function(static_input)
        current.wait_stream(warmup_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.function(static_input)
        return static_input, static_output, graph
