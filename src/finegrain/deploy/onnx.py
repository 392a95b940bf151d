"""Export a checkpoint to ONNX or TorchScript, check it against eager outputs, quantize to INT8.

Only ``task.predict`` is exported (never the training forward), so training-only branches
(auxiliary heads, attention dropping, distillation teachers) are not in the graph. Each file
describes itself: class names and preprocessing travel in ONNX ``metadata_props`` or, for
TorchScript, in a ``finegrain.json`` extra file. INT8 uses ONNX Runtime static quantization
(QDQ, per-channel weights) calibrated on real images.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finegrain.checkpoint import atomic_write
from finegrain.eval.calibration import temperature_of
from finegrain.predict import Predictor, expand_images

FORMATS = ("onnx", "torchscript")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_KEYS = ("classes", "preprocessing", "backbone", "task", "num_classes", "finegrain_version", "source_checkpoint")
TORCHSCRIPT_EXTRA = "finegrain.json"


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"ONNX export needs the 'export' extra: pip install 'finegrain[export]' ({e})") from e
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript is deprecated upstream but still wanted by C++ / mobile users: hide its warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


class _Inference(nn.Module):
    """``images -> logits / T`` through ``task.predict`` only (``T``: the checkpoint's fitted temperature, 1 if none),
    so that the softmax of the exported model's output is calibrated like :class:`~finegrain.Predictor`'s."""

    def __init__(self, task: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.task, self.temperature = task, float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.task.predict(images).float()
        return out / self.temperature if self.temperature != 1.0 else out


def export_metadata(meta: dict, source: str | Path | None = None) -> dict[str, str]:
    """String key/values describing an exported model (classes and preprocessing as JSON)."""
    from finegrain import __version__

    return {
        "classes": json.dumps(list(meta["classes"])),
        "preprocessing": json.dumps(meta["preprocessing"]),
        "backbone": str(meta.get("model", {}).get("backbone", "")),
        "task": str(meta.get("task", "")),
        "num_classes": str(meta["num_classes"]),
        "temperature": str(temperature_of(meta)),
        "finegrain_version": __version__,
        "source_checkpoint": str(source or ""),
    }


def _decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(props)
    for key in ("classes", "preprocessing"):
        if key in out:
            out[key] = json.loads(out[key])
    if "num_classes" in out:
        out["num_classes"] = int(out["num_classes"])
    return out


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """Class names, preprocessing and provenance stored in an exported ``.onnx`` or ``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    try:
        if path.suffix == ".onnx":
            onnx, _ = _require_onnx()
            model = onnx.load(str(path), load_external_data=False)
            return _decode_metadata({p.key: p.value for p in model.metadata_props})
        extra = {TORCHSCRIPT_EXTRA: ""}
        with _quiet_jit():  # TorchScript archives hold TorchScript, which cannot name arbitrary Python globals
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (ImportError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001  (protobuf and TorchScript raise their own error types)
        raise ValueError(f"{path} is not a readable exported model (truncated, corrupt, or not written by "
                         f"`finegrain export`?): {e}") from None
    if not extra[TORCHSCRIPT_EXTRA]:
        raise ValueError(f"{path} has no {TORCHSCRIPT_EXTRA}: was it exported by `finegrain export`?")
    return _decode_metadata(json.loads(extra[TORCHSCRIPT_EXTRA]))


def export_onnx(task: nn.Module, meta: dict, path: str | Path, *, opset: int = 18, source: str | Path | None = None) -> Path:
    """Write ``task.predict`` as a single-file ONNX model with a dynamic batch axis.

    Uses the ``torch.export``-based exporter (``dynamo=True``, the default in torch 2.9+).
    """
    onnx, _ = _require_onnx()
    size = int(meta["preprocessing"]["img_size"])
    module = _Inference(task, temperature_of(meta)).eval()
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(module, (example,), dynamo=True, external_data=False, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes={"images": {0: batch}}, verbose=False)
    model = program.model_proto
    if model.graph.input[0].type.tensor_type.shape.dim[0].dim_value:  # a number, not a symbol: batch was fixed
        raise ValueError(f"the ONNX export of task {meta.get('task')} fixed the batch size (its predict has shapes that "
                         "depend on the batch); export with --format torchscript, or report this as a bug")
    _set_metadata(model, export_metadata(meta, source))
    path = Path(path)
    atomic_write(path, lambda tmp: onnx.save(model, tmp, format="protobuf"))
    return path


def _set_metadata(model, props: dict[str, str]) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for k, v in keep + list(props.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


def export_torchscript(task: nn.Module, meta: dict, path: str | Path, *, source: str | Path | None = None) -> Path:
    """Trace ``task.predict`` to TorchScript; metadata goes in the ``finegrain.json`` extra file."""
    size = int(meta["preprocessing"]["img_size"])
    module = _Inference(task, temperature_of(meta)).eval()
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(module, torch.randn(2, 3, size, size), check_trace=False)
    path = Path(path)
    with _quiet_jit():
        atomic_write(path, lambda tmp: torch.jit.save(traced, tmp, _extra_files={
            TORCHSCRIPT_EXTRA: json.dumps(export_metadata(meta, source))}))
    return path


class OnnxModel:
    """ONNX Runtime session on CPU: ``logits(images)`` for a normalised ``[B, 3, H, W]`` batch."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        _, ort = _require_onnx()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.metadata = read_export_metadata(path)

    def logits(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        x = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _runner(path: Path):
    """A ``logits(tensor) -> np.ndarray`` function for an exported file."""
    if path.suffix == ".onnx":
        return OnnxModel(path).logits
    with _quiet_jit():
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(x).numpy()

    return run


def sample_images(data: str | Path, n: int, *, seed: int = 0, splits: Sequence[str] = ()) -> list[Path]:
    """Up to ``n`` image files of ``data``, a seeded spread.

    With ``splits`` (e.g. ``("test", "train")``), a data set that a reader recognises gives the
    images of the first of those splits it has (CUB's test images, not its whole folder); any
    other file or folder gives every image under it (recursive).
    """
    if not Path(data).exists():
        raise FileNotFoundError(f"image path {data} does not exist")
    files = _split_files(data, splits) if splits else None
    files = files if files else expand_images([data])
    if not files:
        raise FileNotFoundError(f"no images found under {data} (extensions: jpg, png, ...)")
    if n >= len(files):
        return files
    return sorted(random.Random(seed).sample(files, n))


def _split_files(data: str | Path, splits: Sequence[str]) -> list[Path] | None:
    """The files of the first of ``splits`` that ``data`` has as a data set; None when no reader reads it."""
    from finegrain.data.base import open_dataset

    for split in splits:
        try:
            images = open_dataset(data, split)
        except (ValueError, FileNotFoundError):
            continue
        if len(images):
            return [Path(p) for p in images.paths]
    return None


def load_batch(predictor: Predictor, files: Sequence[Path]) -> torch.Tensor:
    """Preprocess image files with the checkpoint's eval transform (unreadable ones are skipped)."""
    from finegrain.data.dataset import load_rgb

    tensors = []
    for f in files:
        try:
            tensors.append(predictor.transform(load_rgb(str(f))))
        except Exception:  # noqa: BLE001  (a bad file must not stop an export)
            continue
    if not tensors:
        raise ValueError(f"none of the {len(files)} images could be read (first: {files[0] if files else None})")
    return torch.stack(tensors)


def compare_logits(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max absolute difference and top-1 agreement (fraction) between two logit arrays."""
    reference, other = np.asarray(reference, dtype=np.float32), np.asarray(other, dtype=np.float32)
    return {
        "max_abs_diff": float(np.abs(reference - other).max()),
        "top1_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
        "images": int(reference.shape[0]),
    }


def verify_export(path: str | Path, predictor: Predictor, images: torch.Tensor, *, batch_size: int = 16) -> dict[str, float]:
    """Run the exported file and the eager ``Predictor`` on the same images and compare."""
    run = _runner(Path(path))
    eager, exported = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        eager.append(predictor.logits(x).cpu().numpy())
        exported.append(run(x))
    return compare_logits(np.concatenate(eager), np.concatenate(exported))


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calibration: torch.Tensor, *, per_channel: bool = True,
                  batch_size: int = 8, tensor_overrides: Callable[[Path], dict] | None = None,
                  report: dict | None = None) -> Path:
    """ONNX Runtime static INT8 quantization (QDQ, uint8 activations, int8 weights).

    Args:
        fp32_path: the float ONNX model from :func:`export_onnx`.
        out_path: where to write the INT8 model (metadata is copied over).
        calibration: preprocessed real images ``[N, 3, H, W]`` to collect activation ranges.
        per_channel: per-output-channel weight scales (much better accuracy for depthwise convs).
        batch_size: calibration batch size.
        tensor_overrides: called with the pre-processed float model that is quantized; returns
            ONNX Runtime ``TensorQuantOverrides`` (``{tensor: [{"scale", "zero_point"}]}``) that
            replace calibrated ranges, e.g. the scales learned by QAT (:mod:`finegrain.compress.qat`).
        report: if given, filled with ``quantized_activations`` (activation tensors with a
            QuantizeLinear), ``overridden`` (how many of them took their scale from
            ``tensor_overrides``) and ``calibrated`` (the names of the others, when overriding).
    """
    onnx, _ = _require_onnx()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT_NAME: calibration[i : i + batch_size].numpy()}
                                  for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            return next(self._batches, None)

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prepared = out_path.with_name(out_path.stem + ".prep.onnx")
    raw = out_path.with_name(out_path.stem + ".raw.onnx")  # ONNX Runtime's output, before the metadata and rename
    try:
        # shape inference + graph cleanup first, as ONNX Runtime recommends before quantizing
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        source = prepared
    except Exception:  # noqa: BLE001  (pre-processing is an optimisation, not a requirement)
        source = fp32_path
    try:
        overrides = tensor_overrides(source) if tensor_overrides is not None else {}
        quantize_static(str(source), str(raw), _Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": overrides} if overrides else None)
        q = onnx.load(str(raw))
    finally:
        prepared.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    if report is not None:
        # ONNX Runtime renames tensors when it drops Clip/Relu, so count by the parameters themselves
        init = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
        pinned = {(float(o[0]["scale"]), int(o[0]["zero_point"])) for o in overrides.values()}
        quantized = {(n.input[0], float(init[n.input[1]]), int(init[n.input[2]])) for n in q.graph.node
                     if n.op_type == "QuantizeLinear" and n.input[0] not in init}
        report.update(quantized_activations=len(quantized), overridden=sum((s, z) in pinned for _, s, z in quantized),
                      calibrated=sorted(n for n, s, z in quantized if (s, z) not in pinned) if overrides else [])
    _set_metadata(q, {**{p.key: p.value for p in fp32.metadata_props}, "quantization": "int8-static-qdq-per-channel"
                      if per_channel else "int8-static-qdq", "calibration_images": str(len(calibration))})
    atomic_write(out_path, lambda tmp: onnx.save(q, tmp, format="protobuf"))
    return out_path


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, format: str = "onnx", int8: bool = False,
                      calib_data: str | Path | None = None, calib_images: int = 64, verify_data: str | Path | None = None,
                      verify_images: int = 32, opset: int = 18) -> dict[str, Any]:
    """Export a checkpoint, verify it against eager outputs and optionally quantize it.

    Args:
        checkpoint: checkpoint file or run folder.
        out: output file (``.onnx`` or ``.pt``); the INT8 model goes beside it as ``<stem>.int8.onnx``.
        format: "onnx" or "torchscript".
        int8: also write a statically quantized INT8 ONNX model (needs ``calib_data``).
        calib_data: folder of real images for INT8 calibration.
        calib_images: how many calibration images to use.
        verify_data: folder of real images to compare outputs on (default: ``calib_data``); without
            one, random inputs are used and the summary says so.
        verify_images: how many images to verify on.
        opset: ONNX opset.

    Returns:
        A summary: paths, export seconds, and per file ``max_abs_diff`` and ``top1_agreement``.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    if int8 and format != "onnx":
        raise ValueError("--int8 needs --format onnx (INT8 quantization uses ONNX Runtime)")
    if int8 and calib_data is None:
        raise ValueError("--int8 needs --calib-data PATH: a folder of real images to calibrate activation ranges")
    if calib_images < 1 or verify_images < 1:
        raise ValueError(f"--calib-images and --verify-images must be at least 1, got {calib_images} and {verify_images}")
    from finegrain.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    out = Path(out)
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"output {out} is the checkpoint itself; choose another path")
    start = time.perf_counter()
    if format == "onnx":
        path = export_onnx(predictor.task, predictor.meta, out, opset=opset, source=ckpt)
    else:
        path = export_torchscript(predictor.task, predictor.meta, out, source=ckpt)
    summary: dict[str, Any] = {"checkpoint": str(ckpt), "format": format, "path": str(path),
                               "export_seconds": round(time.perf_counter() - start, 2)}
    verify_data = verify_data if verify_data is not None else calib_data
    if verify_data is not None:
        images = load_batch(predictor, sample_images(verify_data, verify_images, seed=1, splits=("test", "train")))
        summary["verify_inputs"] = f"{len(images)} real images from {verify_data}"
    else:
        size = predictor.meta["preprocessing"]["img_size"]
        images = torch.randn(verify_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        summary["verify_inputs"] = f"{verify_images} random inputs (pass --verify-data for real images)"
    summary["verify"] = {"fp32": verify_export(path, predictor, images)}
    if int8:
        calib = load_batch(predictor, sample_images(calib_data, calib_images, seed=0, splits=("train",)))
        q_path = path.with_name(path.stem + ".int8.onnx")
        start = time.perf_counter()
        quantize_int8(path, q_path, calib)
        summary["int8_path"] = str(q_path)
        summary["calibration_images"] = len(calib)
        summary["quantize_seconds"] = round(time.perf_counter() - start, 2)
        summary["verify"]["int8"] = verify_export(q_path, predictor, images)
    return summary
