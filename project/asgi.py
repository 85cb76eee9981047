"""HTTP goes to Django; WebSockets go through the auth stack to the Channels consumers."""

from __future__ import annotations

import gc
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddleware  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from channels.sessions import CookieMiddleware, InstanceSessionWrapper  # noqa: E402

from testruns.routing import websocket_urlpatterns  # noqa: E402


class WebSocketSessionMiddleware:
    """Channels' SessionMiddleware (the session from the cookie, for AuthMiddleware) without
    its wrapper around `send`. The wrapper saves a changed session when an HTTP response
    starts, which a WebSocket message never is, yet it reads the session on every message:
    about a tenth of what a page message cost the web process (docs/benchmarks.md, "Live
    pages"). Live pages only read their session, to know the user."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send):
        wrapper = InstanceSessionWrapper(scope, send)
        await wrapper.resolve_session()
        return await self.inner(wrapper.scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # channels.auth.AuthMiddlewareStack, but for the session middleware above.
        "websocket": AllowedHostsOriginValidator(
            CookieMiddleware(
                WebSocketSessionMiddleware(AuthMiddleware(URLRouter(websocket_urlpatterns)))
            )
        ),
    }
)

# Everything the web process holds by now (Django, the app, its libraries: about 290,000
# objects) lives as long as the process. Kept out of the collector's sight, a full collection
# scans only what came later: live pages send bursts of short-lived objects that set off full
# collections every second or two, each a pause of about 200 ms for every page of the process
# when it also rescanned the startup heap (docs/benchmarks.md, "Live pages").
gc.collect()
gc.freeze()
