"""A small project that uses celery-unique: ``python -m example_project demo``."""
