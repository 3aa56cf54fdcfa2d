"""Sphinx configuration: ``sphinx-build -W --keep-going -b html docs docs/_build/html``
(``tox -e docs`` runs it). The front page includes README.rst and the changelog page
CHANGELOG.rst, so the text lives in one place only."""

from importlib.metadata import metadata

import celery_unique

# Django must be configured before autodoc imports celery_unique.contrib.django;
# the app's ready() only registers checks, so no database or Redis is needed.
try:
    import django
    from django.conf import settings
except ImportError:  # pragma: no cover - the docs env installs the django extra
    pass
else:
    if not settings.configured:
        settings.configure(INSTALLED_APPS=["celery_unique.contrib.django"])
        django.setup()

project = metadata("celery-unique")["Name"]
release = version = celery_unique.__version__

extensions = ["sphinx.ext.autodoc"]  # plain reST docstrings: no napoleon
# No intersphinx: the build must not need the network.

exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
# Celery's own docstrings use roles of its docs (:setting:, ...) that we lack.
autodoc_inherit_docstrings = False

html_theme = "alabaster"
