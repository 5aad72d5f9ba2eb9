"""Reports: matplotlib (Agg) plots and self-contained one-page HTML reports."""

from subtomo.report.html import write_html_report
from subtomo.report.plots import plot_central_slices, plot_fsc, plot_guinier, plot_histogram

__all__ = [
    "plot_central_slices",
    "plot_fsc",
    "plot_guinier",
    "plot_histogram",
    "write_html_report",
]
