"""Model compression: structured channel pruning (and knowledge distillation, as a Task)."""
