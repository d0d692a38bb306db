"""Integrations with other training frameworks; each module imports its framework itself."""
