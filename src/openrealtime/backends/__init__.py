"""Model backends behind small async protocols; one module per implementation."""
