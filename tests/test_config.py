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
