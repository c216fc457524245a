"""jinja2 templates for generated layers (data only)."""
