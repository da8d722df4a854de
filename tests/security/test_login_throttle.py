"""Login throttling: per account and per address, exponential, behind a proxy or not, and
never a lock that someone else can keep shut on a named account."""

import time

import pytest
from django.core.cache import cache
from django.test import Client

from core import login
from core.clientip import client_ip, parse_networks
from core.models import AuditEntry

GOOD = {"username": "carol", "password": "carol-password-1"}
BAD = {"username": "carol", "password": "wrong"}


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


class _Clock:
    """The wall clock the gates and the cache's expiry read, moved by the test, not by the
    machine's load (30 requests on a loaded machine can take longer than a 2 s gate)."""

    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(time, "time", c)
    return c


def post(c, data, addr="198.51.100.7", **extra):
    return c.post("/accounts/login/", data, REMOTE_ADDR=addr, **extra)


class _Req:
    def __init__(self, remote, xff=None):
        self.META = {"REMOTE_ADDR": remote}
        if xff is not None:
            self.META["HTTP_X_FORWARDED_FOR"] = xff


# --- which address is the client's ------------------------------------------------------


def test_without_trusted_proxies_the_header_is_ignored(settings):
    settings.TRUSTED_PROXIES = []
    assert client_ip(_Req("198.51.100.7", "203.0.113.9")) == "198.51.100.7"


def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_the_client(settings):
    settings.TRUSTED_PROXIES = ["10.0.0.0/8", "192.0.2.1"]
    # The client wrote "1.2.3.4" itself; 203.0.113.9 is what the outer proxy saw.
    assert client_ip(_Req("10.0.0.1", "1.2.3.4, 203.0.113.9, 192.0.2.1")) == "203.0.113.9"
    assert client_ip(_Req("10.0.0.1", "203.0.113.9")) == "203.0.113.9"
    assert client_ip(_Req("10.0.0.1", "[2001:db8::5]:4711, 10.1.1.1")) == "2001:db8::5"
    # Garbage stops the walk at the last address a trusted proxy vouched for.
    assert client_ip(_Req("10.0.0.1", "203.0.113.9, bogus")) == "10.0.0.1"
    assert client_ip(_Req("10.0.0.1")) == "10.0.0.1"
    # A peer that is not a trusted proxy cannot choose its address with the header.
    assert client_ip(_Req("198.51.100.7", "203.0.113.9")) == "198.51.100.7"


def test_trusted_proxies_must_be_addresses_or_networks():
    assert [str(n) for n in parse_networks(["10.0.0.1", " 10.1.0.0/16 ", "", "::1"])] == [
        "10.0.0.1/32", "10.1.0.0/16", "::1/128",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="nope"):
        parse_networks(["nope"])


def test_behind_a_proxy_one_client_failing_does_not_throttle_the_others(users, settings):
    """The old throttle keyed on REMOTE_ADDR: five failures through the proxy locked everyone out."""
    settings.TRUSTED_PROXIES = ["10.0.0.1"]
    for i in range(8):
        post(Client(), {"username": f"nobody{i}", "password": "x"}, addr="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.5")
    assert (
        post(
            Client(), {"username": "x9", "password": "x"}, addr="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.5"
        ).status_code
        == 429
    )
    r = post(Client(), GOOD, addr="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.6")
    assert r.status_code == 302
    entry = AuditEntry.objects.filter(action="login", outcome="ok").get()
    assert entry.remote_addr == "203.0.113.6"  # the audit names the client, not the proxy
    # A client that talks to the dashboard directly cannot pose as someone else.
    for i in range(6):
        post(
            Client(),
            {"username": f"other{i}", "password": "x"},
            addr="198.51.100.9",
            HTTP_X_FORWARDED_FOR=f"203.0.113.{i}",
        )
    assert (
        post(
            Client(), {"username": "y", "password": "x"}, addr="198.51.100.9", HTTP_X_FORWARDED_FOR="203.0.113.77"
        ).status_code
        == 429
    )


# --- backoff, not a lock -----------------------------------------------------------------


def test_the_delay_doubles_and_is_capped():
    assert [login.delay_after(n) for n in range(1, 8)] == [0, 0, 0, 0, 2, 4, 8]
    assert login.delay_after(12) == 256
    assert login.delay_after(13) == login.delay_after(10_000) == login.MAX_DELAY_S == 300


def test_a_right_password_gets_in_once_the_accounts_delay_has_passed(users, monkeypatch, clock):
    """Five failures close the account's gate for 2 s; knocking on it meanwhile (refused,
    429, password unchecked) neither counts nor extends it; then the right password works,
    from another address as from the same one."""
    import django.contrib.auth.forms

    checked = 0
    real = django.contrib.auth.forms.authenticate

    def counting(*args, **kwargs):
        nonlocal checked
        checked += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(django.contrib.auth.forms, "authenticate", counting)
    c = Client()
    for _ in range(5):
        assert post(c, BAD, addr="198.51.100.1").status_code == 200
    for addr in ("198.51.100.1", "198.51.100.2"):
        r = post(c, GOOD, addr=addr)
        assert r.status_code == 429 and "_auth_user_id" not in c.session
        assert 1 <= int(r["Retry-After"]) <= 2
    for _ in range(30):  # hammering while the gate is shut
        assert post(Client(), BAD, addr="198.51.100.3").status_code == 429
    assert checked == 5  # the refused attempts had no password checked, not even for the form's errors
    clock.advance(1.5)
    assert post(c, GOOD, addr="198.51.100.2").status_code == 429  # not yet
    clock.advance(0.7)
    r = post(c, GOOD, addr="198.51.100.2")
    assert r.status_code == 302 and c.session["_auth_user_id"] == str(users["carol"].pk)


def test_each_further_failure_doubles_the_wait(users, clock):
    c = Client()
    for _ in range(5):
        post(c, BAD)
    clock.advance(2.2)
    assert post(c, BAD).status_code == 200  # the 6th attempt: checked, wrong, the gate shuts for 4 s
    r = post(c, GOOD)
    assert r.status_code == 429 and 3 <= int(r["Retry-After"]) <= 4


def test_an_attacker_cannot_keep_a_user_out_of_a_browser_they_have_used(users):
    mine = Client()
    assert post(mine, GOOD, addr="198.51.100.20").status_code == 302
    assert login.KNOWN_COOKIE in mine.cookies
    mine.post("/accounts/logout/")
    for i in range(5):  # someone else, from several addresses
        post(Client(), BAD, addr=f"203.0.113.{i}")
    assert post(Client(), GOOD, addr="198.51.100.21").status_code == 429  # a new browser waits...
    r = post(mine, GOOD, addr="198.51.100.20")  # ...the known one does not
    assert r.status_code == 302 and mine.session["_auth_user_id"] == str(users["carol"].pk)
    # The cookie is for carol only, and a forged one is worth nothing.
    other = Client()
    other.cookies[login.KNOWN_COOKIE] = mine.cookies[login.KNOWN_COOKIE].value
    for i in range(5):
        post(Client(), {"username": "bob", "password": "x"}, addr=f"203.0.113.{i}")
    assert post(other, {"username": "bob", "password": "bob-password-1"}, addr="198.51.100.22").status_code == 429
    for i in range(5):  # carol's login cleared her account's count: the attacker starts again
        post(Client(), BAD, addr=f"203.0.113.{i}")
    forged = Client()
    forged.cookies[login.KNOWN_COOKIE] = mine.cookies[login.KNOWN_COOKIE].value[:-2] + "xx"
    assert post(forged, GOOD, addr="198.51.100.23").status_code == 429


def test_an_address_that_guesses_is_throttled_whatever_names_it_tries(users):
    for i in range(5):
        post(Client(), {"username": f"guess{i}", "password": "x"}, addr="198.51.100.30")
    assert post(Client(), GOOD, addr="198.51.100.30").status_code == 429
    assert post(Client(), GOOD, addr="198.51.100.31").status_code == 302


def test_an_ipv6_client_is_counted_by_its_64(users):
    for i in range(5):
        post(Client(), {"username": f"guess{i}", "password": "x"}, addr=f"2001:db8:1:2::{i + 1}")
    assert post(Client(), GOOD, addr="2001:db8:1:2:ffff::9").status_code == 429
    assert post(Client(), GOOD, addr="2001:db8:1:3::1").status_code == 302


def test_throttled_attempts_are_audited_once_per_shut_gate(users):
    for _ in range(5):
        post(Client(), BAD)
    for _ in range(10):
        assert post(Client(), GOOD).status_code == 429
    entries = AuditEntry.objects.filter(action="login", outcome="throttled")
    assert entries.count() == 1
    assert entries.get().object_name == "carol" and "without checking the password" in entries.get().detail
    assert AuditEntry.objects.filter(action="login", outcome="failed").count() == 5
