"""Bootloader backends: one small Protocol, one module per bootloader, a registry dict."""
