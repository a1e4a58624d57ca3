"""Networks, the shared training recipe, checkpoints and the model cache (no Lightning)."""

from ggda.models.checkpoint import Checkpoint
from ggda.models.nets import MLP, LogisticRegression
from ggda.models.training import Recipe, train_lean

__all__ = ["Checkpoint", "LogisticRegression", "MLP", "Recipe", "train_lean"]
