"""Built-in strategy components, one module per component; each registers itself like a third-party plugin."""
