from django.urls import path

from . import consumers

websocket_urlpatterns = [
    path("ws/operations/<int:op_id>/", consumers.OperationConsumer.as_asgi()),
    path("ws/events/", consumers.FleetConsumer.as_asgi()),
]
