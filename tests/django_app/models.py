from django.db import models


class Account(models.Model):
    balance = models.IntegerField(default=0)

    class Meta:
        app_label = "django_app"
