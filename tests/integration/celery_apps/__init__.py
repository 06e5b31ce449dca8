"""Small Celery apps and helpers for the integration tests.

The modules here are imported by real ``celery worker`` subprocesses (with
``-A tests.integration.celery_apps.<module>``), so they read everything they
need from environment variables and import nothing from the test modules.
"""
