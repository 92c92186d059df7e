"""Launchers, one per paper experiment: ``python -m flags.<name>`` from the repository root."""
