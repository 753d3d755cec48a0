"""Click command groups of `updater`, one module per group, registered in `updater.cli`."""
