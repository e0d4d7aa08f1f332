"""Pure numeric code: quantization schemes, packing, quantizers, the bit-allocation ILP.

Nothing here imports the IR; only `ilp` imports python-mip and only `gptq` imports torch.
"""
