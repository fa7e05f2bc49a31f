"""Weight-only quantization: `app.quant.woq` (int8 / int4 modules, the portable quantized form, the module
swap), `app.quant.checkpoint` (layer-by-layer quantize-at-load and pre-quantized checkpoints, `lanner
quantize`) and `app.quant.isa.detect_isa` (CPU features that decide the kernels). Nothing is imported here,
so `import app.quant.isa` stays free of torch."""
