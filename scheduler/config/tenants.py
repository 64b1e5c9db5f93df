"""The `tenants` section: who a request belongs to (its API key) and what that tenant may do."""

from __future__ import annotations

from pydantic import Field, SecretStr, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from backend.settings.base import ConfigSection, Key, Problems, raise_if
from scheduler.config.base import resolve_key

__all__ = ["RateConfig", "TenantConfig", "TenantPolicy", "TenantsConfig"]

_TENANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class RateConfig(ConfigSection):
    """A tenant's request rate: ``per_s`` requests a second on average, up to ``burst`` at once
    (a token bucket). With tasks in Redis it holds across every sidecar of the cluster."""

    per_s: StrictFloat = Field(gt=0, le=1e6)
    burst: StrictInt = Field(default=1, ge=1, le=1_000_000)


class TenantPolicy(ConfigSection):
    """What a tenant may do: its fair-queueing weight, the bands it may use, its queue bound, its
    request rate (None: unlimited)."""

    weight: StrictFloat = Field(default=1.0, gt=0)
    # None: every band for a named tenant; priorities.default and the bands below it for the default tenant
    bands: tuple[StrictStr, ...] | None = Field(default=None, min_length=1)
    max_queued: StrictInt | None = Field(default=None, ge=1)  # None: queue.max_per_tenant
    rate: RateConfig | None = None


class TenantConfig(TenantPolicy):
    """A named tenant; a request carrying one of its `keys` (Authorization: Bearer) belongs to it."""

    name: StrictStr = Field(pattern=_TENANT_NAME)
    keys: tuple[SecretStr, ...] = ()  # resolved ("env:NAME" read at load) and masked in reprs

    @field_validator("name")
    @classmethod
    def _not_default(cls, name: str) -> str:
        if name == "default":
            raise ValueError("'default' is the tenant of requests without a key; choose another name")
        return name

    @field_validator("keys", mode="before")
    @classmethod
    def _resolve_keys(cls, value: object) -> object:
        # Raise Problems only: pydantic's own errors would echo the key.
        if not isinstance(value, list | tuple):
            raise Problems([((), "must be a list of API keys")])
        problems: list[tuple[Key, str]] = []
        keys: list[str] = []
        for i, item in enumerate(value):
            key, problem = resolve_key(item)
            if problem is None and key in keys:
                problem = f"same key as keys[{keys.index(key)}]"
            if problem is not None:
                problems.append(((i,), problem))
            keys.append(key)
        raise_if(problems)
        return tuple(SecretStr(key) for key in keys)


class TenantsConfig(ConfigSection):
    require_key: StrictBool = False
    trust_header: StrictBool = False
    default: TenantPolicy = Field(default_factory=TenantPolicy)
    list: tuple[TenantConfig, ...] = ()

    @model_validator(mode="after")
    def _check_tenants(self) -> TenantsConfig:
        problems: list[tuple[Key, str]] = []
        if self.require_key and self.trust_header:
            problems.append((("trust_header",), "has no effect when require_key is true; set one of them"))
        if self.require_key and not self.list:
            problems.append((("require_key",), "no tenant is listed, so every request would get 401"))
        names: dict[str, int] = {}
        key_at: dict[str, tuple[int, int]] = {}
        for i, tenant in enumerate(self.list):
            if tenant.name in names:
                problem = f"duplicate tenant name {tenant.name!r} (also list[{names[tenant.name]}])"
                problems.append((("list", i, "name"), problem))
            names.setdefault(tenant.name, i)
            if not tenant.keys and not self.trust_header:
                problems.append((
                    ("list", i, "keys"),
                    "must list at least one key: with trust_header false no request could reach this tenant",
                ))
            for k, secret in enumerate(tenant.keys):
                key = secret.get_secret_value()
                if key in key_at and key_at[key][0] != i:
                    j, m = key_at[key]
                    problems.append((("list", i, "keys", k), f"same key as list[{j}].keys[{m}]"))
                key_at.setdefault(key, (i, k))
        raise_if(problems)
        return self

    def by_key(self) -> dict[str, TenantConfig]:
        """API key (resolved, unmasked) → its tenant; build it once per loaded config."""
        return {secret.get_secret_value(): tenant for tenant in self.list for secret in tenant.keys}
