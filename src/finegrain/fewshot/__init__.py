"""Few-shot learning: episodic sampling and training, N-way K-shot evaluation, and class enrollment.

The methods (ProtoNet, RelationNet, MAML, the baseline) are Tasks in :mod:`finegrain.tasks.fewshot`.
"""

from finegrain.fewshot.sampler import EpisodicSampler, split_classes
from finegrain.tasks.fewshot import build_method, embed, fewshot_method, fewshot_methods

__all__ = ["EpisodicSampler", "build_method", "embed", "fewshot_method", "fewshot_methods", "split_classes"]
