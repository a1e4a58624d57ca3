"""ggda: Generalized Group Data Attribution.

Attribute model behaviour to *groups* of training points with one batched gradient per
group instead of one per point. See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
