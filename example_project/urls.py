from django.contrib import admin
from django.urls import path

from example_project.loans import views

urlpatterns = [
    path("loans/<int:loan_id>/payments", views.record_payment),
    path("admin/", admin.site.urls),
]
