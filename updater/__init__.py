"""ab-updater: the node agent of an image-based A/B updater for immutable Linux nodes.

The package is a library first; `updater.cli` is a thin click layer over it. Library
code raises the exceptions of `updater.errors` and never prints or exits.
"""

__version__ = "0.1.0"
