"""`updater`: the node agent of ab-updater, an image-based A/B updater for immutable nodes.

A library first; `updater.cli` is a thin click layer over it. Library code raises the
exceptions of `core.errors` and never prints or exits.
"""

from core import __version__

__all__ = ["__version__"]
