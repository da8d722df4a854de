import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ctweb.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from core.auth import TokenAuthMiddlewareStack, browser_origin_validator  # noqa: E402
from operations.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": browser_origin_validator(TokenAuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
