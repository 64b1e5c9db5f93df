"""The admin token: who may use the admin endpoints, and who sees the details of the read ones.

``admin.token`` unset means the admin endpoints are open (scheduler.config refuses that on a
listener that is not loopback unless ``admin.allow_anonymous`` says so) and nobody is privileged:
the details of /api/v1/health and /api/v1/queue are then only on the metrics listener.
"""

from __future__ import annotations

from aiohttp import web

from scheduler.config import AdminConfig
from scheduler.errors import BadAuthorization, Unauthorized

AUTHORIZATION = "Authorization"


def require_admin(request: web.Request, config: AdminConfig) -> None:
    """Raise the answer that turns a request for an admin action away; return when it may proceed.

    The token is compared in constant time (AdminConfig.authenticates)."""
    authorization = request.headers.get(AUTHORIZATION)
    if authorization is not None and not authorization.isascii():
        raise BadAuthorization("The Authorization header must be ASCII: 'Bearer <token>'")
    if not config.allows(authorization):
        raise Unauthorized("This endpoint needs the admin token (Authorization: Bearer <token>)")


def is_admin(request: web.Request, config: AdminConfig) -> bool:
    """Whether the request presents the admin token (none configured: nobody does)."""
    return config.authenticates(request.headers.get(AUTHORIZATION))
