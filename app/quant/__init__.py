"""Weight-only quantization: `app.quant.woq.quantize_model` (int8 / int4 module swap) and
`app.quant.isa.detect_isa` (CPU features that decide the kernels). Nothing is imported here, so
`import app.quant.isa` stays free of torch."""
