"""Quantization-aware fine-tuning (QAT) and its INT8 ONNX export, for when static PTQ loses too much.

Fake quantization with a straight-through estimator follows Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference" (arXiv:1712.05877):
batch norm is folded into the preceding convolution first (frozen statistics, as at deployment),
weights are fake-quantized per output channel (symmetric int8, ``[-127, 127]``) and activations
per tensor (asymmetric uint8) with moving-average min/max ranges. The formulas are ONNX
Runtime's (``compute_scale_zp``), so what the network trains against is what ONNX Runtime runs:

* weights: ONNX Runtime recomputes the per-channel scales from the fine-tuned weights with the
  same formula, so the integers are the ones used in training;
* activations: the QAT scale and zero point of each fake-quantized tensor are written into the
  INT8 model as ``TensorQuantOverrides``. ONNX tensors are matched to the PyTorch tensors they
  hold by value (robust to exporter naming); the few quantized tensors that match no QAT site
  keep a min/max calibration, and the summary counts both.

Only ``torch`` ops are used (``torch.fake_quantize_per_channel_affine`` /
``torch.fake_quantize_per_tensor_affine``): PT2E ``prepare_qat_pt2e`` has moved out of torch 2.14
into ``torchao``, which this project does not depend on.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # symmetric int8, ONNX Runtime's range for per-channel weights
ACT_QMIN, ACT_QMAX = 0, 255  # asymmetric uint8 activations
_TINY = float(np.finfo(np.float32).tiny)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # exported as Relu / Clip, folded into the quantized Conv


# ------------------------------------------------------------------------------------ quantizers


def weight_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 ``(scale [C] float32, zero_point [C] int32)`` of a weight.

    ``scale = max|w_c| / 127``, zero point 0 (ONNX Runtime's ``compute_scale_zp`` for symmetric
    int8); an all-zero channel gets scale 1.
    """
    absmax = w.detach().abs().flatten(1).amax(1).double()
    scale = absmax / ((WEIGHT_QMAX - WEIGHT_QMIN) / 2)
    scale = torch.where(scale < _TINY, torch.ones_like(scale), scale).float()
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def activation_qparams(rmin: torch.Tensor, rmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric uint8 ``(scale float32, zero_point int32)`` for the range ``[rmin, rmax]``.

    The range is widened to contain 0; ``scale = (rmax - rmin) / 255`` and
    ``zero_point = round(-rmin / scale)`` (ONNX Runtime's ``compute_scale_zp``).
    """
    rmin = torch.clamp(rmin.double(), max=0.0)
    rmax = torch.clamp(rmax.double(), min=0.0)
    scale = (rmax - rmin) / (ACT_QMAX - ACT_QMIN)
    tiny = scale < _TINY
    safe = torch.where(tiny, torch.ones_like(scale), scale)
    zero = torch.where(tiny, torch.zeros_like(scale), torch.round(ACT_QMIN - rmin / safe)).clamp(ACT_QMIN, ACT_QMAX)
    return safe.float(), zero.to(torch.int32)


class WeightFakeQuant(nn.Module):
    """Parametrization ``w -> dequant(quant(w))`` per output channel; gradients pass straight through."""

    enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale, zero = weight_qparams(w)
        return torch.fake_quantize_per_channel_affine(w, scale.to(w.device), zero.to(w.device), 0, WEIGHT_QMIN, WEIGHT_QMAX)


class ActivationFakeQuant(nn.Module):
    """Per-tensor uint8 fake quantization with a moving-average min/max range.

    While ``observe`` is on (training mode only, or ``calibrating``) the range tracks the
    tensors seen: the first batch sets it, later ones move it by ``momentum``. With ``enabled``
    off the module is the identity (but still observes).
    """

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(0, dtype=torch.long))
        self.enabled = False
        self.calibrating = False

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if self.calibrating or self.seen.item() == 0:  # plain min/max while calibrating
            first = self.seen.item() == 0
            self.min_val.copy_(lo if first else torch.minimum(self.min_val, lo))
            self.max_val.copy_(hi if first else torch.maximum(self.max_val, hi))
        else:
            self.min_val.lerp_(lo, self.momentum)
            self.max_val.lerp_(hi, self.momentum)
        self.seen += 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return activation_qparams(self.min_val, self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.calibrating:
            self.observe(x)
        if not self.enabled or self.seen.item() == 0:
            return x
        scale, zero = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale.to(x.device), zero.to(x.device), ACT_QMIN, ACT_QMAX)


# ------------------------------------------------------------------------------ batch-norm folding


def _consumers(model: nn.Module, example: torch.Tensor, producers: type | tuple, consumers: type | tuple) -> list[tuple[nn.Module, nn.Module]]:
    """``(producer, consumer)`` module pairs where the consumer's input is the producer's output (one eval pass)."""
    made: dict[int, tuple[nn.Module, torch.Tensor, int]] = {}
    pairs: list[tuple[nn.Module, nn.Module]] = []

    def produced(m, i, o):
        made[id(o)] = (m, o, o._version)  # kept alive, so the id is not reused during the pass

    def consumed(m, i):
        src = made.get(id(i[0]))
        if src is not None and src[0] is not m and src[2] == i[0]._version:  # not changed in place since
            pairs.append((src[0], m))

    hooks = [m.register_forward_hook(produced) for m in model.modules() if isinstance(m, producers)]
    hooks += [m.register_forward_pre_hook(consumed) for m in model.modules() if isinstance(m, consumers)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(pairs))  # a module run twice counts once


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Fold each BatchNorm's scale into the convolution that feeds it, in place; return the BatchNorms.

    Afterwards a folded BatchNorm is a per-channel bias (mean 0, variance 1, weight
    ``sqrt(1 + eps)`` so that its scale is exactly 1), its weight is frozen, and it must stay in
    eval mode. The model keeps its architecture (the state dict loads into a fresh one) and its
    eval outputs. Raises ValueError if they change (a conv output used elsewhere too).
    """
    was_training = model.training
    model.eval()
    reference = model(example)
    folded = []
    for conv, bn in _consumers(model, example, nn.Conv2d, nn.modules.batchnorm._BatchNorm):
        if not bn.track_running_stats or bn.running_var is None:
            continue
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        g = gamma / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(g.view(-1, *([1] * (conv.weight.ndim - 1))))
        shift = beta - bn.running_mean * g
        if conv.bias is not None:
            shift = shift + conv.bias * g
            conv.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        if bn.affine:
            bn.weight.copy_(torch.sqrt(torch.ones_like(bn.weight) + bn.eps))  # BN's own arithmetic gives scale 1
            bn.weight.requires_grad_(False)
            bn.bias.copy_(shift)
        folded.append(bn)
    after = model(example)
    model.train(was_training)
    err = (after - reference).abs().max().item() / max(reference.abs().max().item(), 1e-6)
    if err > 1e-3:
        raise ValueError(f"batch-norm folding changed the outputs (relative error {err:.2g}); "
                         "this architecture reuses convolution outputs and cannot be folded")
    return folded


# ------------------------------------------------------------------------------------ QAT model


class QatModel(nn.Module):
    """A task prepared for QAT: folded BatchNorms, fake-quantized weights and activations.

    ``forward(batch)`` is the task's training forward (so it plugs into ``train_one_epoch``);
    ``predict(images)`` simulates INT8 inference. The quantizers live here, not in the task, so
    the task's state dict keeps its usual keys; :meth:`finalize` removes the fake quantization
    and returns the plain fine-tuned task.

    Fake-quantized points: the input of every Conv2d / Linear, the output of every folded
    BatchNorm (after its activation, where ONNX Runtime quantizes a Conv -> Clip pair) and of
    every Linear; an input that is already such an output is not quantized twice.
    """

    def __init__(self, task: nn.Module, *, img_size: int, momentum: float = 0.01):
        super().__init__()
        self.task = task
        model = task.model
        device = next(task.parameters()).device
        # a fixed probe input: the same task always gets the same quantization sites
        example = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
        self._frozen = fold_batchnorm(model, example)
        self.quantizers = nn.ModuleDict()
        self._hooks: list = []
        self._sites: dict[str, nn.Module] = {}
        names = {m: n for n, m in model.named_modules()}
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for m in layers:
            parametrize.register_parametrization(m, "weight", WeightFakeQuant())
        # ONNX Runtime quantizes a Conv -> Clip/Relu pair after the activation: so do we
        acts = dict(_consumers(model.eval(), example, nn.modules.batchnorm._BatchNorm, _ACTIVATIONS))
        outputs = [acts.get(bn, bn) for bn in self._frozen] + [m for m in layers if isinstance(m, nn.Linear)]
        for m in outputs:
            self._add_site(f"{names[m]}:out", m, output=True, momentum=momentum)
        # inputs that are not already a quantized output (decided by one traced pass)
        quantized_outputs: dict[int, tuple[torch.Tensor, int]] = {}
        needs_input: list[nn.Module] = []

        def mark(m, i, o):
            quantized_outputs[id(o)] = (o, o._version)

        def check(m, i):
            seen = quantized_outputs.get(id(i[0]))
            if (seen is None or seen[1] != i[0]._version) and m not in needs_input:  # in-place ops change it
                needs_input.append(m)

        probe = [m.register_forward_hook(mark) for m in outputs] + [m.register_forward_pre_hook(check) for m in layers]
        try:
            with torch.no_grad():
                model.eval()(example)
        finally:
            for h in probe:
                h.remove()
        for m in needs_input:
            self._add_site(f"{names[m]}:in", m, output=False, momentum=momentum)
        for fq in self._sites.values():  # the probe passes above must not count as observed data
            fq.min_val.zero_()
            fq.max_val.zero_()
            fq.seen.zero_()

    def _add_site(self, name: str, module: nn.Module, *, output: bool, momentum: float) -> None:
        fq = ActivationFakeQuant(momentum)
        self.quantizers[name.replace(".", "/")] = fq
        self._sites[name] = fq
        if output:
            self._hooks.append(module.register_forward_hook(lambda m, i, o: fq(o)))
        else:
            self._hooks.append(module.register_forward_pre_hook(lambda m, i: (fq(i[0]), *i[1:])))

    @property
    def sites(self) -> dict[str, ActivationFakeQuant]:
        """Activation quantizers by ``"<module>:in"`` / ``"<module>:out"``."""
        return dict(self._sites)

    def set_mode(self, *, enabled: bool | None = None, calibrating: bool | None = None) -> None:
        for fq in self._sites.values():
            if enabled is not None:
                fq.enabled = enabled
            if calibrating is not None:
                fq.calibrating = calibrating

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in self._frozen:  # folded statistics are constants now
            bn.eval()
        return self

    def forward(self, batch: dict) -> dict:
        return self.task(batch)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.predict(images)

    def activation_qparams(self) -> dict[str, tuple[float, int]]:
        """``{site: (scale, zero_point)}`` of every activation quantizer that has seen data."""
        out = {}
        for name, fq in self._sites.items():
            if fq.seen.item() > 0:
                s, z = fq.qparams()
                out[name] = (float(s), int(z))
        return out

    @torch.no_grad()
    def site_tensors(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The float tensor each activation quantizer sees on ``images`` (fake quantization off)."""
        seen: dict[str, torch.Tensor] = {}
        hooks = []
        model = self.task.model
        mods = dict(model.named_modules())
        for name in self._sites:
            mod_name, _, kind = name.rpartition(":")
            m = mods[mod_name]
            if kind == "out":
                hooks.append(m.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, o.detach().clone())))
            else:
                hooks.append(m.register_forward_pre_hook(lambda m, i, n=name: seen.__setitem__(n, i[0].detach().clone())))
        enabled = {n: fq.enabled for n, fq in self._sites.items()}
        weight_fq = [m for m in model.modules() if isinstance(m, WeightFakeQuant)]
        self.set_mode(enabled=False)
        for m in weight_fq:
            m.enabled = False
        self.eval()
        try:
            self.task.predict(images)
        finally:
            for h in hooks:
                h.remove()
            for n, fq in self._sites.items():
                fq.enabled = enabled[n]
            for m in weight_fq:
                m.enabled = True
        return seen

    def finalize(self) -> nn.Module:
        """Remove hooks and parametrizations; return the task with its fine-tuned float weights."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self.task.model.modules():
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        return self.task.eval()


# ------------------------------------------------------------------------ ONNX tensor matching


def match_onnx_tensors(onnx_path: str | Path, site_tensors: dict[str, torch.Tensor], images: torch.Tensor, *,
                       rtol: float = 1e-3) -> dict[str, str]:
    """``{onnx tensor name: site}`` for float tensors of the model equal (to ``rtol``) to a site's tensor.

    Runs the ONNX model on ``images`` with every intermediate tensor exposed; the same images
    must have produced ``site_tensors``.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    existing = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    names = [o for n in model.graph.node for o in n.output if o and o not in existing]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: images.cpu().numpy().astype(np.float32)}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    outs.update({k: v for k, v in feed.items() if k in inputs})
    by_shape: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for site, t in site_tensors.items():
        by_shape.setdefault(tuple(t.shape), []).append((site, t.cpu().float().numpy()))
    matches: dict[str, str] = {}
    for name, value in outs.items():
        if not isinstance(value, np.ndarray) or value.dtype != np.float32:
            continue
        for site, ref in by_shape.get(tuple(value.shape), []):
            scale = max(float(np.abs(ref).max()), 1e-6)
            if float(np.abs(value - ref).max()) <= rtol * scale + 1e-6:
                matches[name] = site
                break
    return matches


# --------------------------------------------------------------------------------- end to end


def qat_finetune(task: nn.Module, meta, data: str | Path, *, epochs: int = 1, lr: float = 5e-5,
                 batch_size: int = 32, workers: int = 1, calib_images: int = 64, device: str | torch.device = "cpu",
                 max_train_images: int | None = None, seed: int = 0, run_dir: str | Path | None = None,
                 resume: bool = False, source: str | Path = "") -> tuple[QatModel, list[dict]]:
    """Prepare ``task`` for QAT, calibrate its ranges and fine-tune it on ``data``'s train split.

    Training goes through the one trainer (:func:`finegrain.train.finetune.finetune`: AdamW,
    cosine schedule, no weight decay on the already-trained weights) in ``run_dir``, so an
    interrupted QAT fine-tune resumes (``resume=True``; calibration is then restored, not redone).

    Args:
        task: a trained task (modified in place).
        meta: its checkpoint metadata (classes, preprocessing).
        data: the training images (same classes as the checkpoint).
        epochs: fine-tuning epochs with fake quantization on.
        lr: peak learning rate.
        batch_size, workers: data loading.
        calib_images: training images (eval transform) used to initialise the activation ranges.
        device: training device.
        max_train_images: train on a seeded subset of this many images (a time budget).
        seed: subset, order and augmentation seed.
        run_dir: the fine-tune's run folder (needed when ``epochs > 0``).
        resume: continue the interrupted fine-tune in ``run_dir``.
        source: the checkpoint ``task`` came from (recorded in the run's lineage).

    Returns:
        ``(qat_model, history)``: the prepared model (fake quantization on) and one row per epoch.
    """
    from finegrain import checkpoint as ckpt
    from finegrain.data.base import open_dataset
    from finegrain.train.finetune import finetune

    if epochs < 0 or calib_images < 1:
        raise ValueError(f"--epochs must be >= 0 and --calib-images >= 1, got {epochs} and {calib_images}")
    if epochs > 0 and run_dir is None:
        raise ValueError("a QAT fine-tune needs a run folder (run_dir) for its checkpoints")
    dev = torch.device(device)
    images = open_dataset(data, "train")
    if images.classes != meta["classes"]:
        raise ValueError(f"the classes of {data} differ from the checkpoint's; QAT needs the data it was trained on")
    rng = np.random.default_rng(seed)
    if max_train_images is not None and max_train_images < len(images):
        images = images.subset(sorted(rng.choice(len(images), max_train_images, replace=False).tolist()))
    prep = meta["preprocessing"]
    qat = QatModel(task.to(dev), img_size=prep["img_size"]).to(dev)
    calib_idx = sorted(rng.choice(len(images), min(calib_images, len(images)), replace=False).tolist())
    if not resume:  # a resumed fine-tune restores the ranges with the rest of the state
        _calibrate(qat, images.subset(calib_idx), prep, batch_size=batch_size, workers=workers, device=dev)
    qat.set_mode(calibrating=False, enabled=True)
    if epochs == 0:
        return qat.eval(), []
    # last.safetensors of this run holds the QatModel (fake-quant parametrizations): it is resume state, not a task checkpoint
    run_meta = ckpt.derive(meta, "qat-training", source, details={"weights": "QatModel (resume state only)"})
    r = finetune(qat, images, prep, Path(run_dir), run_meta, epochs=epochs, lr=lr, batch_size=batch_size, workers=workers,
                 device=dev, seed=seed, amp=False, resume=resume, save_best=False, label="QAT epoch",
                 annotations=tuple(task.annotations))
    if r.interrupted:
        raise KeyboardInterrupt(f"QAT fine-tune interrupted; continue it with --resume (run folder {run_dir})")
    return qat.eval(), r.history


def _calibrate(qat: QatModel, images, prep: dict, *, batch_size: int, workers: int, device: torch.device) -> None:
    """Activation ranges: plain min/max over calibration images (eval transform), like static PTQ, before any training."""
    from torch.utils.data import DataLoader

    from finegrain.data.dataset import ImageDataset, collate
    from finegrain.data.transforms import eval_transform

    t_eval = eval_transform(prep["img_size"], mean=prep["mean"], std=prep["std"], crop_pct=prep["crop_pct"],
                            interpolation=prep["interpolation"])
    calib = DataLoader(ImageDataset(images, t_eval), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    qat.eval()
    qat.set_mode(calibrating=True, enabled=False)
    with torch.no_grad():
        for batch in calib:
            if batch["image"] is not None:
                qat.predict(batch["image"].to(device))


def qat_checkpoint(checkpoint: str | Path, out: str | Path, data: str | Path, *, epochs: int = 1, lr: float = 5e-5,
                   batch_size: int = 32, workers: int = 1, calib_images: int = 64, verify_images: int = 32,
                   max_train_images: int | None = None, device: str = "auto", opset: int = 18,
                   resume: bool = False) -> dict[str, Any]:
    """QAT-fine-tune a checkpoint and write an INT8 ONNX model whose activation scales are the QAT ones.

    Writes ``out`` (INT8 QDQ ONNX), ``<stem>.fp32.onnx`` (the fine-tuned float model it was
    quantized from) and ``<stem>.safetensors`` (the fine-tuned, batch-norm-folded checkpoint,
    usable by every other command). Verification compares, on ``verify_images`` test images
    (``data``'s test split, or train if there is none): the INT8 model against the original
    eager model and against the fake-quantized model it simulates.

    Returns:
        A summary: paths, seconds, how many quantized tensors carry QAT scales, the training
        history and the verification numbers.
    """
    from finegrain.checkpoint import resolve_checkpoint
    from finegrain.deploy.onnx import OnnxModel, load_batch, sample_images
    from finegrain.predict import Predictor
    from finegrain.utils import resolve_device

    ckpt = resolve_checkpoint(checkpoint)
    out, fp32_path, ckpt_path, run_dir = _output_paths(ckpt, out, data)
    dev = resolve_device(device)  # a bad --device fails before the fine-tune's folder is made
    original = Predictor.from_checkpoint(ckpt, device="cpu")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_train_images": max_train_images,
                "calib_images": calib_images}
    start = time.perf_counter()
    if epochs > 0:
        from finegrain.train.trainer import open_job

        resume = open_job(run_dir, {"checkpoint": str(ckpt), "data": str(data), **settings}, resume=resume)
    qat, history = qat_finetune(copy.deepcopy(original.task), original.meta, data, epochs=epochs, lr=lr,
                                batch_size=batch_size, workers=workers, calib_images=calib_images,
                                device=dev, max_train_images=max_train_images, run_dir=run_dir,
                                resume=resume, source=ckpt)
    train_seconds = time.perf_counter() - start
    qat = qat.to("cpu").eval()
    verify = load_batch(original, sample_images(data, verify_images, seed=1, splits=("test", "train")))
    simulated = qat.predict(verify).float().numpy()
    params_by_site = qat.activation_qparams()
    sites = qat.site_tensors(verify[:2])
    _save_tuned(qat.finalize(), original.meta, ckpt, ckpt_path, fp32_path, params_by_site, settings, opset=opset)

    start = time.perf_counter()
    report = _quantize_with_qat_scales(fp32_path, out, original, data, calib_images=calib_images, sites=sites,
                                       site_inputs=verify[:2], params_by_site=params_by_site)
    quantize_seconds = time.perf_counter() - start
    int8 = OnnxModel(out).logits(verify)
    eager = (original.logits(verify) * original.temperature).numpy()  # unscaled, like the exports of the derived weights
    return {
        "checkpoint": str(ckpt), "int8_path": str(out), "fp32_path": str(fp32_path), "qat_checkpoint": str(ckpt_path),
        "train_seconds": round(train_seconds, 2), "quantize_seconds": round(quantize_seconds, 2),
        "history": history, "activation_sites": len(params_by_site),
        "quantized_tensors": report.get("quantized_activations"), "qat_scaled_tensors": report.get("overridden"),
        "calibrated_tensors": report.get("calibrated"),
        "verify_inputs": f"{len(verify)} real images from {data}",
        "verify": _agreement(eager, simulated, int8),
    }


def _output_paths(ckpt: Path, out: str | Path, data: str | Path) -> tuple[Path, Path, Path, Path]:
    """The INT8 model, float model, fine-tuned checkpoint and fine-tune folder for ``out``, checked before any work."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise ValueError(f"--out must be an .onnx file, got {out}")
    if not Path(data).exists():
        raise FileNotFoundError(f"training data {data} does not exist")
    stem = out.name[: -len(".onnx")].removesuffix(".int8")
    fp32_path, ckpt_path = out.with_name(stem + ".fp32.onnx"), out.with_name(stem + ".safetensors")
    if ckpt_path.resolve() == ckpt.resolve():
        raise ValueError(f"{ckpt_path} would overwrite the input checkpoint; choose another --out")
    return out, fp32_path, ckpt_path, out.with_name(stem + ".qat-finetune")


def _save_tuned(tuned: nn.Module, meta: dict, source: Path, ckpt_path: Path, fp32_path: Path,
                params_by_site: dict[str, tuple[float, int]], settings: dict[str, Any], *, opset: int) -> None:
    """Save the fine-tuned float task (no fake quantization: it is what gets exported and quantized) as a derived
    checkpoint that records its QAT scales, and export it to ONNX fp32."""
    from finegrain import checkpoint as ckpt_io
    from finegrain.deploy.onnx import export_onnx

    qat_meta = {**settings, "activation_qparams": {k: list(v) for k, v in params_by_site.items()},
                "weights": "per-channel symmetric int8 [-127, 127]", "activations": "per-tensor asymmetric uint8"}
    details = {"epochs": settings["epochs"], "lr": settings["lr"]}
    derived = ckpt_io.derive(meta, "qat", source, details=details, qat=qat_meta)  # no temperature: new weights
    ckpt_io.save(ckpt_path, tuned.state_dict(), derived)
    export_onnx(tuned, derived, fp32_path, opset=opset, source=source)


def _agreement(eager: np.ndarray, simulated: np.ndarray, int8: np.ndarray) -> dict[str, Any]:
    """How closely the INT8 model's logits follow the eager model's and the fake-quantized model's."""
    from finegrain.deploy.onnx import compare_logits

    return {"int8_vs_eager": compare_logits(eager, int8), "int8_vs_simulated": compare_logits(simulated, int8),
            "simulated_vs_eager": compare_logits(eager, simulated)}


def _quantize_with_qat_scales(fp32_path: Path, out: Path, original, data: str | Path, *, calib_images: int,
                              sites: dict[str, torch.Tensor], site_inputs: torch.Tensor,
                              params_by_site: dict[str, tuple[float, int]]) -> dict[str, Any]:
    """INT8 ONNX of ``fp32_path`` whose activation scales are the QAT ones (min/max calibration for the rest); its report.

    The INT8 model keeps the float model's metadata (the fine-tuned checkpoint's: no temperature, as its graph applies
    none) and says it was quantized with QAT scales.
    """
    import onnx

    from finegrain.checkpoint import atomic_write
    from finegrain.deploy.onnx import _set_metadata, load_batch, quantize_int8, sample_images

    def overrides(prepared: Path):
        matches = match_onnx_tensors(prepared, sites, site_inputs)
        return _overrides_from_matches(prepared, matches, params_by_site)

    calib = load_batch(original, sample_images(data, calib_images, seed=0, splits=("train",)))
    report: dict[str, Any] = {}
    quantize_int8(fp32_path, out, calib, tensor_overrides=overrides, report=report)
    q = onnx.load(str(out))
    _set_metadata(q, {"quantization": "int8-qat-qdq-per-channel", "qat_tensors": str(report.get("overridden", 0))})
    atomic_write(out, lambda tmp: onnx.save(q, tmp, format="protobuf"))  # replaces quantize_int8's file whole
    return report


def _overrides_from_matches(prepared: Path, matches: dict[str, str], params: dict[str, tuple[float, int]]) -> dict:
    import onnx

    out = {name: [{"scale": np.array(params[site][0], dtype=np.float32),
                   "zero_point": np.array(params[site][1], dtype=np.uint8)}]
           for name, site in matches.items() if site in params}
    graph = onnx.load(str(prepared), load_external_data=False).graph
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    for n in graph.node:  # ONNX Runtime gives a Clip's input its output's range: keep them equal
        if n.op_type in ("Clip", "Relu") and n.output[0] in out and consumers.get(n.input[0]) == 1:
            out.setdefault(n.input[0], out[n.output[0]])
    return out
