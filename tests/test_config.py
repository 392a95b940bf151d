"""finegrain.config: ModelConfig / RunConfig checks name the flag, task options by flag name, round trips."""

from __future__ import annotations

import dataclasses

import pytest

from finegrain.config import ModelConfig, RunConfig
from finegrain.tasks import TASKS


def test_model_config_check_names_the_flag():
    from finegrain.config import RunConfig

    def model(task, **flags):  # task options by flag name, as the CLI and config files give them
        return RunConfig.from_dict({"model": {"task": task, **flags}}).model

    model("fgvc", attention="cbam", pooling="compact_bilinear", loss="ce+triplet:1").check()
    ModelConfig(task="fgvc", options={"attention": "cbam", "pooling": "compact_bilinear"}).check()
    with pytest.raises(ValueError, match="--pooling must be one of"):
        model("fgvc", pooling="billinear").check()
    with pytest.raises(ValueError, match="--task fgvc"):
        model("supervised", attention="se").check()
    with pytest.raises(ValueError, match="--wsdan-parts"):
        model("wsdan", wsdan_parts=0).check()
    with pytest.raises(ValueError, match="task wsdan has no options.*num_parts"):
        ModelConfig(task="wsdan", options={"parts": 3}).check()


def _model(task, **flags):
    """A ModelConfig given the way flags and config files give it: task options by their flag names."""
    return RunConfig.from_dict({"model": {"task": task, **flags}}).model


def test_model_config_checks_the_new_flags():
    _model("racnn", racnn_scales=2, racnn_shared_backbone=False).check()
    _model("parts", parts_groups="cub6", parts_pool="mil").check()
    _model("parts-weak", parts_num=6, parts_size=0.3).check()
    _model("distill", teacher="t.safetensors", kd_attention_weight=500).check()
    _model("transfg", transfg_contrastive_weight=0.5, transfg_margin=0.3).check()
    for task, flags, match in (("racnn", {"racnn_scales": 4}, "--racnn-scales must be 2 or 3"),
                               ("supervised", {"racnn_scales": 2}, "drop --racnn-scales"),
                               ("parts-weak", {"parts_groups": "cub6"}, "drop --parts-groups"),
                               ("parts", {"parts_num": 3}, "add --task parts-weak"),
                               ("fgvc", {"parts_pool": "mil"}, "--task parts or --task parts-weak"),
                               ("supervised", {"kd_attention_weight": 1.0}, "drop --kd-attention-weight"),
                               ("fgvc", {"transfg_margin": 0.2}, "drop --transfg-margin"),
                               ("parts", {"parts_pool": "max"}, "--parts-pool must be"),
                               ("parts", {"parts_groups": "wings"}, "--parts-groups must be"),
                               ("parts", {"parts_size": 0.0}, "--parts-size")):
        with pytest.raises(ValueError, match=match):
            _model(task, **flags).check()


@pytest.mark.parametrize("task_name", [t for t in TASKS.names() if TASKS.get(t).trainer == "supervised" and t != "distill"])
def test_every_task_round_trips_its_options(task_name):
    """ModelConfig keeps the shared fields; each task's options survive to_dict/from_dict."""
    from finegrain.config import RunConfig

    cfg = RunConfig()
    cfg.model = ModelConfig(task=task_name)
    cfg.model.check()
    again = RunConfig.from_dict(cfg.to_dict())
    again.model.check()
    assert again.model.options == cfg.model.options and isinstance(again.model.options, TASKS.get(task_name).Options)
    shared = {f.name for f in dataclasses.fields(ModelConfig)}
    assert shared == {"backbone", "pretrained", "task", "drop_rate", "drop_path_rate", "options"}


def test_task_option_flags_land_in_the_task_s_options(tmp_path):
    from finegrain.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--data", "x", "--task", "wsdan", "--wsdan-parts", "4"])
    cfg = config_from_args(args)
    cfg.model.check()
    assert cfg.model.options.num_parts == 4 and cfg.to_dict()["model"]["options"] == {"num_parts": 4}
    with pytest.raises(ValueError, match="--wsdan-parts only applies to --task wsdan"):
        config_from_args(build_parser().parse_args(["train", "--data", "x", "--wsdan-parts", "4"]))


@pytest.mark.parametrize("yaml_model", ["{task: wsdan, wsdan_parts: 6}", "{task: wsdan, options: {num_parts: 6}}"])
def test_config_files_give_task_options_flat_or_nested(tmp_path, yaml_model):
    from finegrain.cli import build_parser, config_from_args

    path = tmp_path / "c.yaml"
    path.write_text(f"model: {yaml_model}\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--data", "x", "--config", str(path)]))
    cfg.model.check()
    assert cfg.model.options.num_parts == 6


def test_few_shot_tasks_are_refused_by_train_with_the_command_to_use(image_folder, tmp_path, capsys):
    from finegrain.cli import main

    assert main(["train", "--data", str(image_folder), "--task", "protonet", "--backbone", "test_resnet", "--pretrained", "none",
                 "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "finegrain fewshot train --method protonet" in " ".join(capsys.readouterr().err.split())


def test_config_checks_ask_the_registries():
    from finegrain.config import DataConfig, TrainConfig
    from finegrain.data.transforms import AUGMENTS, train_transform
    from finegrain.train.balance import CLASS_WEIGHTS
    from finegrain.train.optim import OPTIMIZERS

    for name in AUGMENTS.names():
        DataConfig(data="x", augment=name).check()
        assert train_transform(32, augment=name) is not None
    for name in OPTIMIZERS.names():
        TrainConfig(optimizer=name).check()
    for name in CLASS_WEIGHTS.names():
        TrainConfig(class_weights=name).check()
    with pytest.raises(ValueError, match="--optimizer must be one of adam, adamw, rmsprop, sgd.*'adamw'"):
        TrainConfig(optimizer="adamww").check()
    with pytest.raises(ValueError, match="--augment must be one of"):
        DataConfig(data="x", augment="heavy").check()


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam", "rmsprop"])
def test_every_optimizer_keeps_the_parameter_groups(name):
    from finegrain.config import TrainConfig
    from finegrain.models.backbone import create_backbone
    from finegrain.tasks import build_task
    from finegrain.train.optim import build_optimizer

    task = build_task("supervised", create_backbone("test_resnet", num_classes=3), 3)
    opt = build_optimizer(task, TrainConfig(optimizer=name, backbone_lr_mult=0.1), lr=1.0)
    assert type(opt).__name__.lower() == name and {g["lr"] for g in opt.param_groups} == {1.0, 0.1}
