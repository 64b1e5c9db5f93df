"""Who is asking, at which priority (scheduler.core.tenants)."""

from __future__ import annotations

import pytest

from scheduler.config import parse_config
from scheduler.core.tenants import DEFAULT_TENANT, Tenant, TenantDirectory, TenantError
from scheduler.runtime.build import build_tenants

BANDS = ("interactive", "standard", "batch")
ACME = Tenant(name="acme", weight=3.0, bands=(0, 1, 2), max_queued=20)
BULK = Tenant(name="bulk", weight=1.0, bands=(1, 2))
NIGHT = Tenant(name="night", bands=(2,))
VIP = Tenant(name="vip", bands=(0,))
GUEST = Tenant(name="guest", bands=(1, 2))  # no keys: only X-Tenant (when trusted) reaches it
DEFAULT = Tenant(name=DEFAULT_TENANT)
KEYS = {"k-acme": "acme", "k-bulk": "bulk", "k-night": "night", "k-vip": "vip"}


def directory(*, require_key: bool = False, trust_header: bool = False) -> TenantDirectory:
    return TenantDirectory(tenants=[ACME, BULK, NIGHT, VIP, GUEST], keys=KEYS, default=DEFAULT, band_names=BANDS,
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


@pytest.mark.parametrize("header", ["Bearer nope", "Bearer k-acm", "Bearer k-acme2", "Bearer \udcff"])
def test_an_unknown_key_may_be_the_default_tenant_when_keys_are_optional(header: str) -> None:
    lenient = directory().attribute(authorization=header, tenant_header=None, priority_header=None,
                                    unknown_key_is_default=True)
    assert (lenient.tenant.name, lenient.band) == (DEFAULT_TENANT, 1)
    strict = directory(require_key=True)
    with pytest.raises(TenantError) as info:
        strict.attribute(authorization=header, tenant_header=None, priority_header=None, unknown_key_is_default=True)
    assert (info.value.status, info.value.detail) == (401, "Unknown API key")


@pytest.mark.parametrize("require_key", [False, True])
def test_a_known_key_still_names_its_tenant_and_a_malformed_header_is_still_401(require_key: bool) -> None:
    d = directory(require_key=require_key)
    got = d.attribute(authorization="Bearer k-night", tenant_header=None, priority_header="interactive",
                      unknown_key_is_default=True)
    assert (got.tenant.name, got.band) == ("night", 2)
    for header in ("Basic k-acme", "Bearer", "k-acme"):
        with pytest.raises(TenantError) as info:
            d.attribute(authorization=header, tenant_header=None, priority_header=None, unknown_key_is_default=True)
        assert info.value.status == 401


def test_without_a_key_the_default_tenant_unless_a_key_is_required() -> None:
    assert attribute(directory(), None) == (DEFAULT_TENANT, 1)
    assert attribute(directory(), "") == (DEFAULT_TENANT, 1)
    assert refused(directory(require_key=True), None) == (401, "unauthorized")
    assert refused(directory(require_key=True), None, tenant="acme") == (401, "unauthorized")
    assert attribute(directory(require_key=True), "Bearer k-bulk") == ("bulk", 1)


def test_x_tenant_counts_only_when_trusted() -> None:
    trusted = directory(trust_header=True)
    assert attribute(trusted, tenant="guest") == ("guest", 1)
    assert attribute(trusted, tenant=" guest ", priority="interactive") == ("guest", 1)
    assert attribute(trusted, tenant=DEFAULT_TENANT) == (DEFAULT_TENANT, 1)
    assert refused(trusted, tenant="mallory") == (400, "unknown_tenant")
    assert attribute(directory(), tenant="guest") == (DEFAULT_TENANT, 1)  # untrusted: ignored
    assert attribute(directory(), tenant="mallory") == (DEFAULT_TENANT, 1)
    assert attribute(trusted, "Bearer k-bulk", tenant="guest") == ("bulk", 1)  # the key wins


@pytest.mark.parametrize("name", ["acme", " bulk ", "vip"])
def test_x_tenant_cannot_claim_a_tenant_that_has_keys(name: str) -> None:
    trusted = directory(trust_header=True)
    assert refused(trusted, tenant=name) == (401, "unauthorized")
    assert refused(trusted, tenant=name, priority="interactive") == (401, "unauthorized")
    assert attribute(trusted, f"Bearer k-{name.strip()}", tenant=name)[0] == name.strip()  # with its key: fine
    assert attribute(directory(), tenant=name) == (DEFAULT_TENANT, 1)  # untrusted: ignored, as before


# What aiohttp hands over for header bytes that are not UTF-8 (surrogateescape), and other lone surrogates.
NOT_ASCII = ["Bearer \udcff", "Bearer k-acme\udcff", "Bearer \udcffk-acme", "\udcffBearer k-acme",
             "Bearer \ud800", "Bearer k-\u00e4cme", "Bearer \udcc3\udca4"]


@pytest.mark.parametrize("header", NOT_ASCII)
@pytest.mark.parametrize("require_key", [False, True])
def test_a_key_that_is_not_ascii_is_an_unknown_key(header: str, require_key: bool) -> None:
    assert refused(directory(require_key=require_key), header) == (401, "unauthorized")
    assert refused(directory(trust_header=True), header, tenant="guest") == (401, "unauthorized")


def test_a_surrogate_never_matches_a_key_by_substitution() -> None:
    # A lossy encoding ("replace": "?") would let "k-q\udcff..." match the key "k-q?...".
    d = TenantDirectory(tenants=[ACME], keys={"k-q?0123456789abcdef": "acme"}, default=DEFAULT, band_names=BANDS,
                        default_band="standard")
    assert attribute(d, "Bearer k-q?0123456789abcdef")[0] == "acme"
    assert refused(d, "Bearer k-q\udcff0123456789abcdef") == (401, "unauthorized")
    assert refused(d, "Bearer k-q\ud8000123456789abcdef") == (401, "unauthorized")


def test_other_headers_that_are_not_ascii_are_400() -> None:
    trusted = directory(trust_header=True)
    assert refused(trusted, tenant="gu\udcffest") == (400, "unknown_tenant")
    assert refused(trusted, priority="inter\udcffactive") == (400, "unknown_priority")


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
    assert d.names == [DEFAULT_TENANT, "acme", "bulk", "night", "vip", "guest"]
    assert d.tenant("acme") is ACME
    assert d.tenant(DEFAULT_TENANT) is DEFAULT
    with pytest.raises(KeyError):
        d.tenant("mallory")
    attributed = d.attribute(authorization="Bearer k-acme", tenant_header=None, priority_header=None)
    assert (attributed.tenant.weight, attributed.tenant.max_queued) == (3.0, 20)


def built(text: str) -> TenantDirectory:
    return build_tenants(parse_config(text))


def test_the_default_tenant_gets_the_default_band_and_below_unless_its_bands_say_otherwise() -> None:
    d = built("{}")  # bands interactive, standard, batch; default standard
    assert d.default.bands == (1, 2)
    assert [attribute(d, priority=p)[1] for p in ("interactive", "standard", "batch", None)] == [1, 1, 2, 1]
    lowest = built("priorities: {bands: [a, b, c, d], default: c}")
    assert lowest.default.bands == (2, 3)
    assert attribute(lowest, priority="a") == (DEFAULT_TENANT, 2)
    explicit = built("tenants: {default: {bands: [interactive, batch]}}")
    assert attribute(explicit, priority="interactive") == (DEFAULT_TENANT, 0)  # an explicit list wins


def test_named_tenants_without_bands_keep_every_band() -> None:
    d = built("tenants: {trust_header: true, list: [{name: acme, keys: [acme-key-0123456789]}, {name: guest}]}")
    assert attribute(d, "Bearer acme-key-0123456789", priority="interactive") == ("acme", 0)
    assert attribute(d, tenant="guest", priority="interactive") == ("guest", 0)
    assert refused(d, tenant="acme") == (401, "unauthorized")
