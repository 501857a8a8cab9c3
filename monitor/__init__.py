"""energy-monitor: keeps mining sites inside the energy limits set for them.

The version is read from the installed package metadata, here and nowhere else.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("energy-monitor")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
