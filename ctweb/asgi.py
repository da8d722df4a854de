import os
from concurrent.futures import ThreadPoolExecutor

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ctweb.settings")
django_asgi_app = get_asgi_application()

from hosts.ssh import check_key_at_start  # noqa: E402

# A web node without the fleet's SSH key refuses to start once hosts exist (one sentence). In a
# thread of its own: whoever imports this may run an event loop, where Django refuses queries.
with ThreadPoolExecutor(1) as _pool:
    _pool.submit(check_key_at_start).result()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from core.auth import TokenAuthMiddlewareStack, browser_origin_validator  # noqa: E402
from operations.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": browser_origin_validator(TokenAuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
