"""Explanations: Grad-CAM, Grad-CAM++, attention rollout, overlays and localization scores."""

from finegrain.explain.cam import METHODS, attention_rollout, default_method, explain, grad_cam, grad_cam_pp, overlay, save_overlays
from finegrain.explain.score import energy_in_box, localization_scores, map_box, pointing_game

__all__ = [
    "METHODS", "attention_rollout", "default_method", "explain", "grad_cam", "grad_cam_pp", "overlay", "save_overlays",
    "energy_in_box", "localization_scores", "map_box", "pointing_game",
]
