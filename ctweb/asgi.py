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

try:  # Daphne serves this; under another ASGI server there is nothing to change
    from daphne.http_protocol import WebRequest
except ImportError:
    WebRequest = None


def _bodies_to_django(request_class) -> None:
    """Daphne's HTTP layer (Twisted) parses every multipart POST body itself, into memory, for
    an args table Daphne never reads, and answers a body it cannot parse with a bare 400 and no
    headers before ctweb sees it: the API's JSON error never came, and an upload (an export
    archive, up to CTWEB_EXPORT_MAX_BYTES) was parsed in memory once more. Twisted lets a
    request skip that (parsePOSTFormSubmission); Django parses the body as before."""
    init = request_class.__init__
    if getattr(init, "ctweb_bodies_to_django", False):
        return

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        init(self, *args, **kwargs)

    __init__.ctweb_bodies_to_django = True
    request_class.__init__ = __init__


if WebRequest is not None:
    _bodies_to_django(WebRequest)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from core.auth import TokenAuthMiddlewareStack, browser_origin_validator  # noqa: E402
from operations.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": browser_origin_validator(TokenAuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
