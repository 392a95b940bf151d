"""Model compression: structured channel pruning and quantization-aware fine-tuning (QAT).

Knowledge distillation is a Task (:mod:`finegrain.tasks.distill`). The QAT module needs the
``export`` extra (ONNX) only for its INT8 export; import it as ``finegrain.compress.qat``.
"""
