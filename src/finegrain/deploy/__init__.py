"""Deployment: ONNX / TorchScript export checked against eager outputs, INT8 quantization (static PTQ,
or quantization-aware fine-tuning with :mod:`finegrain.deploy.qat`)."""

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
from finegrain.deploy.qat import QatModel, fold_batchnorm, qat_checkpoint, qat_finetune

__all__ = ["OnnxModel", "QatModel", "compare_logits", "export_checkpoint", "export_onnx", "export_torchscript",
           "fold_batchnorm", "qat_checkpoint", "qat_finetune", "quantize_int8", "read_export_metadata", "verify_export"]
