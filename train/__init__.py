"""Lightning training for routers (the runtime never imports this package)."""
