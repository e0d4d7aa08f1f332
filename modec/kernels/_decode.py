"""The decode expressions shared by every kernel: packed code -> exact float (q - z).

Layout `n16k32` (docs/packing.md): the 32 codes of one block form a little-endian bitstream
over `bits` uint32 words, code j at bits [j*bits, j*bits + bits).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx

#: 0x4B000000 is the fp32 bit pattern of 2^23. OR-ing an integer c < 2^23 into its mantissa
#: gives the float 2^23 + c exactly, so (2^23 + q) - (2^23 + z) is q - z exactly, with one
#: integer OR (fused with the mask into one vpternlogd) instead of an int-to-float convert.
MAGIC = 0x4B000000


def code_expr(load_word: Any, j: Any, bits: int) -> tirx.PrimExpr:
    """Code j (0..31) of a block as uint32.

    Args:
        load_word: callable w -> the uint32 word w (0..bits-1) of the block.
        j: the position of the code inside its block (an expression; constant once unrolled).
        bits: the code width.
    """
    u32 = "uint32"
    pos = j * bits
    w = tirx.floordiv(pos, 32)
    off = tirx.Cast(u32, tirx.floormod(pos, 32))
    v = tirx.shift_right(load_word(w), off)
    if 32 % bits != 0:
        # Codes that straddle two words take their high bits from the next word. The index
        # is clamped and the shift masked so that the untaken side of the select is defined.
        w1 = tirx.min(w + 1, bits - 1)
        hi_shift = (tirx.const(32, u32) - off) & tirx.const(31, u32)
        hi = tirx.shift_left(load_word(w1), hi_shift)
        straddles = off + tirx.const(bits, u32) > tirx.const(32, u32)
        v = v | tirx.Select(straddles, hi, tirx.const(0, u32))
    return v & tirx.const((1 << bits) - 1, u32)


def magic_float(code_u32: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^23 + code as float32, exactly (see `MAGIC`)."""
    return tirx.reinterpret("float32", code_u32 | tirx.const(MAGIC, "uint32"))


def centered(code_u32: tirx.PrimExpr, zero_u8: tirx.PrimExpr) -> tirx.PrimExpr:
    """float32(q - z), exact, from a uint32 code and a uint8 zero point."""
    return magic_float(code_u32) - magic_float(tirx.Cast("uint32", zero_u8))


def code_in_place(load_word: Any, j: Any, bits: int) -> tirx.PrimExpr:
    """Code j of a block left where it sits in its word: ``q · 2^off`` as uint32.

    One AND with a constant mask (once the j loop is unrolled) instead of shift + mask; the
    caller multiplies the activation by ``2^-off`` (`in_place_shift`) once per k, which is
    exact. Codes that straddle two words (3-bit) are assembled by `code_expr` (offset 0).
    """
    u32 = "uint32"
    pos = j * bits
    off = tirx.Cast(u32, tirx.floormod(pos, 32))
    mask = tirx.shift_left(tirx.const((1 << bits) - 1, u32), off)
    v = load_word(tirx.floordiv(pos, 32)) & mask
    if 32 % bits == 0:
        return v
    straddles = off + tirx.const(bits, u32) > tirx.const(32, u32)
    return tirx.Select(straddles, code_expr(load_word, j, bits), v)


def in_place_shift(j: Any, bits: int) -> tirx.PrimExpr:
    """The bit offset (int32) at which `code_in_place` leaves code j."""
    off = tirx.floormod(j * bits, 32)
    if 32 % bits == 0:
        return off
    return tirx.Select(off + bits > 32, 0, off)


def pow2_neg(e: tirx.PrimExpr) -> tirx.PrimExpr:
    """2^-e as float32, exactly, for 0 <= e <= 31 (built from the exponent bits)."""
    return tirx.reinterpret("float32", tirx.Cast("uint32", 127 - e) << tirx.const(23, "uint32"))
