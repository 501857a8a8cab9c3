"""energy-monitor: keeps mining sites inside the energy limits set for them."""

__version__ = "0.1.0"
