"""A low-bit MatMul weight as a weight-only method leaves it, before it is emitted (numpy).

``W: [K, N]`` (``y = x W``) is stored in one of three forms:

* affine: ``W ≈ s · (q − z)`` per block of ``group_size`` rows (``quant_math``);
* offset: ``W = s · q + m`` with a float minimum ``m`` per block (GGUF Q4_1 grids kept as
  they are, ``qcompiler.grid``);
* codebook: ``W = C[n, idx]`` (k-means, ``qcompiler.kmeans``).

The emitters (``passes.emit_matmulnbits``, ``passes.emit_dequantize_linear``) turn each form
into graph nodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler import quant_math as qm

WEIGHT_KEY = "qcompile.packed_weight"  # node.meta key: the PackedWeight of a MatMul


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """``W: [K, N]`` in ``bits``-bit form; exactly one of the three forms is set.

    ``q``: ``[K, N]`` integers (uint8 storage for unsigned forms and codebook indices, int8 for
    symmetric ones). ``scale``, ``zero_point``, ``offset``: ``[ceil(K/g), N]`` (``g = K`` for
    per-channel). ``codebook``: ``[N, 2^bits]`` or ``[1, 2^bits]``. ``method``: provenance
    (``rtn``, ``gptq``, ``awq``, ``kmeans``, ``grid``).
    """

    bits: int
    group_size: int  # rows per block (K for per-channel)
    q: np.ndarray
    method: str
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    offset: np.ndarray | None = None
    codebook: np.ndarray | None = None

    @property
    def form(self) -> str:
        if self.codebook is not None:
            return "codebook"
        return "offset" if self.offset is not None else "affine"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def block(self) -> tuple[int, int]:
        return (self.group_size, 1)

    @property
    def signed(self) -> bool:
        return self.q.dtype == np.int8

    def dequantize(self) -> np.ndarray:
        """The float32 ``W`` this form stands for."""
        if self.form == "codebook":
            rows = np.arange(self.q.shape[1]) if self.codebook.shape[0] > 1 else 0
            return self.codebook[rows, self.q.astype(np.int64)].astype(np.float32)
        if self.form == "offset":
            scale = qm.expand_params(self.scale, self.block, self.q.shape)
            offset = qm.expand_params(self.offset, self.block, self.q.shape)
            return (scale * self.q.astype(np.float32) + offset).astype(np.float32)
        return qm.dequantize(self.q, self.scale, self.zero_point, self.block)

    @classmethod
    def from_quantized(cls, t: qm.QuantizedTensor, bits: int, method: str) -> "PackedWeight":
        """From ``quant_math``'s result (``block = (g, 1)``)."""
        if len(t.block) != 2 or t.block[1] != 1:
            raise ValueError(f"a weight-only block runs along K: got {t.block}")
        return cls(bits, int(t.block[0]), t.q, method, scale=t.scale, zero_point=t.zero_point)
