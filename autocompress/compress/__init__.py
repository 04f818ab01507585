"""The compression engine. ``apply(model, plan, task)`` runs every step; each is usable alone."""

from __future__ import annotations

from autocompress.compress._apply import apply, check_plan, restructure
from autocompress.compress._finetune import FinetuneDiverged, distill
from autocompress.compress._lowrank import factorize
from autocompress.compress._meta import QuantRecord, quant_records
from autocompress.compress._prune import magnitude_mask, prune
from autocompress.compress._quant import attach, bake
from autocompress.compress._tiers import TieredEmbedding, row_counts, split_tables
from autocompress.compress._width import shrink_width

__all__ = [
    "FinetuneDiverged",
    "QuantRecord",
    "TieredEmbedding",
    "apply",
    "attach",
    "bake",
    "check_plan",
    "distill",
    "factorize",
    "magnitude_mask",
    "prune",
    "quant_records",
    "restructure",
    "row_counts",
    "shrink_width",
    "split_tables",
]
