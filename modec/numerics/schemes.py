"""The weight quantization scheme, defined once for the quantizer, the packer, the kernels
and the manifest.

A scheme `w<bits>g<group>` quantizes a weight W[N, K] (N output rows, K the reduction axis)
group-wise along K, asymmetrically: w ≈ (q - z) · s with integer codes q, z in [0, 2^bits - 1]
and one fp16 scale s and one uint8 zero z per (row, group). When K is not a multiple of the
group size, the last group is shorter (ceil(K / group) groups per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from modec.errors import BadInputError

#: Widths the packer and kernels support. 1 and 8 are allowed as candidates, 5-7 pack but
#: have no scheduled kernel.
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)

SCALE_BYTES = 2  # fp16 scale per (row, group)
ZERO_BYTES = 1  # uint8 zero point per (row, group)


@dataclass(frozen=True)
class QuantScheme:
    """Group-wise asymmetric weight-only quantization.

    Attributes:
        bits: code width, 1..8.
        group_size: number of consecutive K elements that share a scale and a zero.
    """

    bits: int
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise BadInputError(
                f"unsupported bit width {self.bits}; choose from {list(SUPPORTED_BITS)}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise BadInputError(
                f"unsupported group size {self.group_size}; choose from "
                f"{list(SUPPORTED_GROUP_SIZES)}"
            )

    @property
    def name(self) -> str:
        return f"w{self.bits}g{self.group_size}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def num_groups(self, k: int) -> int:
        return math.ceil(k / self.group_size)

    def nbytes(self, n: int, k: int) -> dict[str, int]:
        """Storage of one [N, K] weight: packed codes, scales and zeros, in bytes.

        Codes are counted at exactly `bits` per weight, rounded up to whole bytes per row
        (the packer's layout may add padding; it reports its own size).
        """
        groups = self.num_groups(k)
        return {
            "codes": n * math.ceil(k * self.bits / 8),
            "scales": n * groups * SCALE_BYTES,
            "zeros": n * groups * ZERO_BYTES,
        }

    def bits_per_weight(self, k: int) -> float:
        """Average stored bits per weight including scales and zeros."""
        b = self.nbytes(1, k)
        return 8.0 * (b["codes"] + b["scales"] + b["zeros"]) / k
