"""Evaluations of group attributions on top of the shared retraining service."""

from ggda.evaluation.base import EvalContext, EvalResult, Evaluator
from ggda.evaluation.lds import LDS
from ggda.evaluation.noisy_labels import NoisyLabels
from ggda.evaluation.pruning import Pruning
from ggda.evaluation.retrain import RetrainService

__all__ = [
    "EvalContext",
    "EvalResult",
    "Evaluator",
    "LDS",
    "NoisyLabels",
    "Pruning",
    "RetrainService",
]
