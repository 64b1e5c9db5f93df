"""Who is asking, at which priority (scheduler.tenants)."""

from __future__ import annotations

import pytest

from scheduler.tenants import DEFAULT_TENANT, Tenant, TenantDirectory, TenantError

BANDS = ("interactive", "standard", "batch")
ACME = Tenant(name="acme", weight=3.0, bands=(0, 1, 2), max_queued=20)
BULK = Tenant(name="bulk", weight=1.0, bands=(1, 2))
NIGHT = Tenant(name="night", bands=(2,))
VIP = Tenant(name="vip", bands=(0,))
DEFAULT = Tenant(name=DEFAULT_TENANT)
KEYS = {"k-acme": "acme", "k-bulk": "bulk", "k-night": "night", "k-vip": "vip"}


def directory(*, require_key: bool = False, trust_header: bool = False) -> TenantDirectory:
    return TenantDirectory(tenants=[ACME, BULK, NIGHT, VIP], keys=KEYS, default=DEFAULT, band_names=BANDS,
                           default_band="standard", require_key=require_key, trust_header=trust_header)


def attribute(d: TenantDirectory, authorization: str | None = None, tenant: str | None = None,
              priority: str | None = None) -> tuple[str, int]:
    got = d.attribute(authorization=authorization, tenant_header=tenant, priority_header=priority)
    return got.tenant.name, got.band


def refused(d: TenantDirectory, authorization: str | None = None, tenant: str | None = None,
            priority: str | None = None) -> tuple[int, str]:
    with pytest.raises(TenantError) as info:
        d.attribute(authorization=authorization, tenant_header=tenant, priority_header=priority)
    assert info.value.detail == str(info.value)
    return info.value.status, info.value.reason


@pytest.mark.parametrize("header", ["Bearer k-acme", "bearer k-acme", "BEARER k-acme", "  Bearer   k-acme  "])
def test_a_bearer_key_names_its_tenant_whatever_the_scheme_case(header: str) -> None:
    assert attribute(directory(), header) == ("acme", 1)


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer k-acm", "Bearer k-acme2", "Basic k-acme", "Bearer",
                                    "Bearer   ", "k-acme"])
@pytest.mark.parametrize("require_key", [False, True])
def test_a_wrong_or_malformed_key_is_401_even_when_keys_are_optional(header: str, require_key: bool) -> None:
    assert refused(directory(require_key=require_key), header) == (401, "unauthorized")


def test_without_a_key_the_default_tenant_unless_a_key_is_required() -> None:
    assert attribute(directory(), None) == (DEFAULT_TENANT, 1)
    assert attribute(directory(), "") == (DEFAULT_TENANT, 1)
    assert refused(directory(require_key=True), None) == (401, "unauthorized")
    assert refused(directory(require_key=True), None, tenant="acme") == (401, "unauthorized")
    assert attribute(directory(require_key=True), "Bearer k-bulk") == ("bulk", 1)


def test_x_tenant_counts_only_when_trusted() -> None:
    trusted = directory(trust_header=True)
    assert attribute(trusted, tenant="acme") == ("acme", 1)
    assert attribute(trusted, tenant=" bulk ") == ("bulk", 1)
    assert attribute(trusted, tenant=DEFAULT_TENANT) == (DEFAULT_TENANT, 1)
    assert refused(trusted, tenant="mallory") == (400, "unknown_tenant")
    assert attribute(directory(), tenant="acme") == (DEFAULT_TENANT, 1)  # untrusted: ignored
    assert attribute(directory(), tenant="mallory") == (DEFAULT_TENANT, 1)
    assert attribute(trusted, "Bearer k-bulk", tenant="acme") == ("bulk", 1)  # the key wins


@pytest.mark.parametrize(("tenant_key", "priority", "band"), [
    ("k-acme", "interactive", 0),
    ("k-acme", "batch", 2),
    ("k-acme", " Interactive ", 0),  # band names are case-insensitive, trimmed
    ("k-bulk", "interactive", 1),  # capped at its highest allowed band
    ("k-bulk", "standard", 1),
    ("k-bulk", "batch", 2),
    ("k-bulk", None, 1),
    ("k-night", "interactive", 2),
    ("k-night", None, 2),  # the default band is capped too
    ("k-night", "", 2),
    ("k-vip", "batch", 0),  # nothing allowed at or below batch: its only band
    ("k-vip", None, 0),
])
def test_x_priority_is_capped_by_the_allowed_bands(tenant_key: str, priority: str | None, band: int) -> None:
    assert attribute(directory(), f"Bearer {tenant_key}", priority=priority)[1] == band


@pytest.mark.parametrize("priority", ["urgent", "0", "interactive,batch"])
def test_an_unknown_band_is_400(priority: str) -> None:
    assert refused(directory(), "Bearer k-acme", priority=priority) == (400, "unknown_priority")


def test_a_tenant_never_gets_a_band_it_may_not_use() -> None:
    d = directory()
    for key, tenant in [("k-acme", ACME), ("k-bulk", BULK), ("k-night", NIGHT), ("k-vip", VIP)]:
        for priority in [None, *BANDS]:
            band = attribute(d, f"Bearer {key}", priority=priority)[1]
            assert band in tenant.bands


def test_lookup_by_name() -> None:
    d = directory()
    assert d.names == [DEFAULT_TENANT, "acme", "bulk", "night", "vip"]
    assert d.tenant("acme") is ACME
    assert d.tenant(DEFAULT_TENANT) is DEFAULT
    with pytest.raises(KeyError):
        d.tenant("mallory")
    attributed = d.attribute(authorization="Bearer k-acme", tenant_header=None, priority_header=None)
    assert (attributed.tenant.weight, attributed.tenant.max_queued) == (3.0, 20)
