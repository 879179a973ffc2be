"""The evaluate stage's charts: the core's generic PNG charts (``pipeline.charts``)."""

from pipeline.charts import bar_png, lines_png, metric_charts

__all__ = ["bar_png", "lines_png", "metric_charts"]
