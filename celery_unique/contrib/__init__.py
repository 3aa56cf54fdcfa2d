"""Integrations with frameworks; the core never imports them."""
