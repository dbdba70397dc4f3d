"""The proxy's own web pages, rendered from Jinja2 templates."""
