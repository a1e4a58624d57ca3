"""Networks, the LightningModule and the shared training recipe."""

from ggda.models.module import GGDAModule
from ggda.models.nets import MLP, LogisticRegression
from ggda.models.training import Recipe, train_lean

__all__ = ["GGDAModule", "LogisticRegression", "MLP", "Recipe", "train_lean"]
