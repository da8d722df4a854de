from django.urls import path

import core.converters  # noqa: F401  (registers <id:...>)

from . import consumers

websocket_urlpatterns = [
    path("ws/operations/<id:op_id>/", consumers.OperationConsumer.as_asgi()),
    path("ws/events/", consumers.FleetConsumer.as_asgi()),
]
