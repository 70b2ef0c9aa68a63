"""The toolkit's library: one module per concern (see DESIGN.md)."""
