"""The admin's models, without tables (``managed = False``)."""

from django.db import migrations, models


def _model(name: str, verbose_name: str, permission: tuple[str, str]) -> migrations.CreateModel:
    return migrations.CreateModel(
        name=name,
        fields=[
            ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
        ],
        options={
            "managed": False,
            "default_permissions": ("view",),
            "permissions": (permission,),
            "verbose_name": verbose_name,
        },
    )


class Migration(migrations.Migration):  # type: ignore[misc]
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [
        _model("Lock", "lock", ("release_lock", "Can release a lock")),
        _model("Outcome", "stored outcome", ("forget_outcome", "Can forget a stored outcome")),
        _model("FanIn", "open fan-in", ("expire_fan_in", "Can expire a fan-in")),
    ]
