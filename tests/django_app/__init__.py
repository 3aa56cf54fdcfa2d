"""A minimal Django app for the Django integration tests (tables made by syncdb)."""
