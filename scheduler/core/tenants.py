"""Who is asking, and at which priority. Pure.

``Authorization: Bearer <key>`` names a tenant (keys compared in constant time); without a key,
a trusted ``X-Tenant`` header may name a tenant that has no keys (one that has keys needs one of
them: 401), else the request belongs to the default tenant -- unless keys are required, then it
is refused (401). ``X-Priority`` asks for a band; a tenant gets the highest band it is allowed
that is not above the one asked for.

``unknown_key_is_default`` is for APIs whose clients always send a key (OpenAI's SDKs): when keys
are not required, a well-formed key that names no tenant is the default tenant's rather than a
401 (a malformed Authorization header is still one).

Header values arrive as aiohttp decodes them (UTF-8, undecodable bytes as lone surrogates): any
string is handled, and one that is no key is an unknown key.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_TENANT = "default"


class TenantError(Exception):
    """The request cannot be attributed: ``status`` is 401 (credentials) or 400 (bad header)."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, kw_only=True)
class Tenant:
    name: str
    weight: float = 1.0
    bands: tuple[int, ...] = ()  # allowed band indexes, ascending (0 = highest); () = all
    max_queued: int | None = None


@dataclass(frozen=True, kw_only=True)
class Attribution:
    tenant: Tenant
    band: int


class TenantDirectory:
    def __init__(self, *, tenants: Sequence[Tenant], keys: Mapping[str, str], default: Tenant,
                 band_names: Sequence[str], default_band: str, require_key: bool = False,
                 trust_header: bool = False) -> None:
        self._by_name = {t.name: t for t in tenants}
        self._keys = [(key.encode(), name) for key, name in keys.items()]
        self._keyed = frozenset(keys.values())  # tenants only a key may claim
        self.default = default
        self.band_names = tuple(band_names)
        self.default_band = self.band_names.index(default_band)
        self.require_key = require_key
        self.trust_header = trust_header

    @property
    def names(self) -> list[str]:
        return [self.default.name, *self._by_name]

    def tenant(self, name: str) -> Tenant:
        return self.default if name == self.default.name else self._by_name[name]

    def _by_key(self, key: str) -> Tenant | None:
        given = key.encode("utf-8", "surrogatepass")  # a lone surrogate compares unequal, never raises
        found: str | None = None
        for candidate, name in self._keys:  # every key is compared: the time does not leak which
            if hmac.compare_digest(candidate, given):
                found = name
        return self._by_name[found] if found is not None else None

    def attribute(self, *, authorization: str | None, tenant_header: str | None,
                  priority_header: str | None, unknown_key_is_default: bool = False) -> Attribution:
        tenant = self._identify(authorization, tenant_header,
                                unknown_key_is_default=unknown_key_is_default and not self.require_key)
        return Attribution(tenant=tenant, band=self._band(tenant, priority_header))

    def _identify(self, authorization: str | None, tenant_header: str | None, *,
                  unknown_key_is_default: bool) -> Tenant:
        if authorization:
            scheme, _, key = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise TenantError(401, "unauthorized", "Authorization must be 'Bearer <API key>'")
            tenant = self._by_key(key.strip())
            if tenant is None:
                if unknown_key_is_default:
                    return self.default
                raise TenantError(401, "unauthorized", "Unknown API key")
            return tenant
        if self.require_key:
            raise TenantError(401, "unauthorized", "An API key is required (Authorization: Bearer <key>)")
        if tenant_header and self.trust_header:
            name = tenant_header.strip()
            if name == self.default.name:
                return self.default
            if name not in self._by_name:
                raise TenantError(400, "unknown_tenant", f"X-Tenant names no configured tenant: {name!r}")
            if name in self._keyed:
                raise TenantError(401, "unauthorized",
                                  f"Tenant {name!r} has API keys: send one (Authorization: Bearer <key>), "
                                  "X-Tenant cannot claim it")
            return self._by_name[name]
        return self.default

    def _band(self, tenant: Tenant, priority_header: str | None) -> int:
        if priority_header is None or not priority_header.strip():
            wanted = self.default_band
        else:
            name = priority_header.strip().lower()
            if name not in self.band_names:
                raise TenantError(400, "unknown_priority",
                                  f"X-Priority must be one of {', '.join(self.band_names)}; got {name!r}")
            wanted = self.band_names.index(name)
        allowed = tenant.bands or tuple(range(len(self.band_names)))
        # The highest allowed band not above the one asked for; else the tenant's highest.
        at_or_below = [b for b in allowed if b >= wanted]
        return min(at_or_below) if at_or_below else max(allowed)
