from django.apps import AppConfig


class LoansConfig(AppConfig):
    name = "example_project.loans"
    default_auto_field = "django.db.models.BigAutoField"
