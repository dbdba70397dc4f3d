"""The upstream services: one module each, and the table of them."""
