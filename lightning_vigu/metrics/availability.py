"""How a metric says it cannot run here (missing local weights, missing Java)."""

from __future__ import annotations


class MetricUnavailable(RuntimeError):
    """A metric cannot be built because something local is missing (weights file, Java).

    The message names what is missing and how to make it. Evaluation code catches this
    exception, prints the message once and skips the metric; nothing is ever downloaded.
    """
