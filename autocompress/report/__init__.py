"""Plots and the self-contained HTML report of a search run."""

from __future__ import annotations

from autocompress.report._html import write_report
from autocompress.report._plots import front_plot, hypervolume_plot, layer_plan_plot

__all__ = ["front_plot", "hypervolume_plot", "layer_plan_plot", "write_report"]
