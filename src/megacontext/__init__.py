"""MegaContext."""
