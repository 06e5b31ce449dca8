"""Celery app modules the beat and CLI tests load with ``-A``."""
