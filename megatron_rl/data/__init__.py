"""Prompt datasets, chat templates and synthetic tasks."""
