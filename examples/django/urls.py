from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("chat", views.chat),
    path("items/<int:item_id>", views.item),
    path("stream/<int:chunks>", views.stream),
    path("metrics", views.metrics),
]
