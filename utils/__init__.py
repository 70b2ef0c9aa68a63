"""The toolkit's library: one module per concern; docs/architecture.md lists them and shows the data flow."""
