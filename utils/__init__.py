"""The toolkit's library: one module per concern; docs/architecture.md lists them and shows the data flow."""

__version__ = "1.1.0"  # the one version string: every script's --version, exported files' metadata
