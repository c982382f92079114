"""Integrations with training frameworks (the only place that touches their internals)."""
