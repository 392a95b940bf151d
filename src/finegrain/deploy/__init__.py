"""Deployment: ONNX / TorchScript export checked against eager outputs, and static INT8 quantization
(quantization-aware fine-tuning is in :mod:`finegrain.compress.qat`)."""

from finegrain.deploy.onnx import (
    OnnxModel,
    compare_logits,
    export_checkpoint,
    export_onnx,
    export_torchscript,
    quantize_int8,
    read_export_metadata,
    verify_export,
)

__all__ = ["OnnxModel", "compare_logits", "export_checkpoint", "export_onnx", "export_torchscript", "quantize_int8",
           "read_export_metadata", "verify_export"]
