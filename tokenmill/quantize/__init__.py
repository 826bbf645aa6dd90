"""``tokenmill quantize``: GPTQ and round-to-nearest quantization of a float model, written as a
standard GPTQ checkpoint (v1 format) that tokenmill and other GPTQ loaders read."""
