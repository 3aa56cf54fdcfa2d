"""A small Django project that uses celery-unique: ``python -m example_project demo``.

As in any Django project with Celery, importing the project loads its Celery
app, so that ``@app.task`` and ``current_app`` refer to it.
"""

from example_project.celery_app import app as celery_app

__all__ = ["celery_app"]
