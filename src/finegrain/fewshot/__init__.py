"""Few-shot learning: episodic sampling, ProtoNet / RelationNet / MAML / baseline, and class enrollment."""

from finegrain.fewshot.methods import METHODS, build_method, embed
from finegrain.fewshot.sampler import EpisodicSampler, split_classes

__all__ = ["METHODS", "EpisodicSampler", "build_method", "embed", "split_classes"]
