"""Keep the float model's first output on a few samples, for a later pass to measure against.

An accuracy target compares the quantized model with the float one. Measured after every other
quantization (embedding tables, the LM head), a float model can no longer be had by switching
the quantized layers back: the tables and the head would stay quantized and their error would
go unseen. So the float outputs are taken here, before anything is quantized, on the samples
the target is measured on.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir

from qcompiler.calibration import FeedSource, observing


class FloatReferencePass(ir.passes.InPlacePass):
    """Run the model (still float) on the first ``samples`` of ``feeds`` once and keep them
    (``inputs``) and its first output on each (``outputs``). Never modifies the model; a second
    call runs nothing."""

    def __init__(self, feeds: FeedSource, samples: int) -> None:
        super().__init__()
        self.feeds, self.samples = feeds, samples
        self.inputs: list = []
        self.outputs: list[np.ndarray] | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.outputs is None:
            output = model.graph.outputs[0]
            self.inputs = list(itertools.islice(self.feeds(), self.samples))
            with observing(model, [output]) as run:
                self.outputs = [run(f)[output.name] for f in self.inputs]
        return ir.passes.PassResult(model, modified=False)
