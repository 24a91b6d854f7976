"""Pure policy: domain matching and relay-trick refusal, with property-based tests."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtp_relay.policy import (
    VERDICT_CACHE_SIZE,
    Decision,
    DomainAllowlist,
    PolicyError,
    RelayPolicy,
    ascii_address,
    check_address,
    normalize_domain,
)

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=2, max_size=4).map(".".join)
local = st.from_regex(r"[A-Za-z0-9._+-]{1,20}", fullmatch=True)


def allow(*patterns: str) -> DomainAllowlist:
    return DomainAllowlist.parse(patterns)


def test_exact_domain_matches_only_itself() -> None:
    lst = allow("example.com")
    assert check_address("a@example.com", lst).allowed
    assert not check_address("a@sub.example.com", lst).allowed
    assert not check_address("a@example.com.evil.net", lst).allowed
    assert not check_address("a@notexample.com", lst).allowed


def test_wildcard_subdomain_pattern_excludes_the_parent_itself() -> None:
    lst = allow("*.example.com")
    assert check_address("a@mail.example.com", lst).allowed
    assert check_address("a@x.y.example.com", lst).allowed
    assert not check_address("a@example.com", lst).allowed
    assert not check_address("a@evilexample.com", lst).allowed


def test_star_alone_allows_any_domain() -> None:
    assert check_address("a@anything.test", allow("*")).allowed


def test_matching_ignores_case_and_trailing_dot() -> None:
    lst = allow("Example.COM.")
    assert check_address("a@EXAMPLE.com", lst).allowed
    assert check_address("a@example.com.", lst).allowed


def test_internationalised_domains_match_in_either_form() -> None:
    assert check_address("a@xn--bcher-kva.example", allow("bücher.example")).allowed
    assert check_address("a@bücher.example", allow("xn--bcher-kva.example")).allowed
    assert check_address("a@BÜCHER.example", allow("bücher.example")).allowed


def test_internationalised_domains_follow_idna_2008_not_the_old_ss_mapping() -> None:
    # IDNA 2003 (Python's "idna" codec) made faß.de into fass.de: another, separately registered domain.
    listed = allow("faß.de")
    assert check_address("a@xn--fa-hia.de", listed).allowed
    assert check_address("a@faß.de", listed).allowed
    assert not check_address("a@fass.de", listed).allowed
    assert check_address("a@faß.de", allow("xn--fa-hia.de")).allowed
    assert not check_address("a@faß.de", allow("fass.de")).allowed
    assert normalize_domain("ς.gr") == "xn--3xa.gr"  # the final sigma is kept, not mapped to the medial one
    assert normalize_domain("xn--zz.example") is None  # not a valid A-label


def test_a_labels_in_use_that_idna_2008_disallows_still_match() -> None:
    # Registered under IDNA 2003 and still resolving (i❤.ws, ☃.com): a relay is not a registry.
    assert check_address("a@xn--i-7iq.ws", allow("*")).allowed
    assert check_address("a@xn--n3h.com", allow("☃.com")).allowed
    assert DomainAllowlist.parse(["*.xn--n3h.com"]).matches("mail.xn--n3h.com")


@pytest.mark.parametrize(
    ("address", "decision"),
    [
        ("", Decision.NULL_SENDER),
        ("<>", Decision.NULL_SENDER),
        ("user%other.net@example.com", Decision.ROUTING),
        ("other.net!user@example.com", Decision.ROUTING),
        ("@hop.net:user@example.com", Decision.ROUTING),
        ('"user@other.net"@example.com', Decision.ROUTING),
        ("no-domain", Decision.MALFORMED),
        ("user@", Decision.MALFORMED),
        ("user\r\n@example.com", Decision.MALFORMED),
        ("user\x00@example.com", Decision.MALFORMED),
        ("user@exa mple.com", Decision.MALFORMED),
        ("user@[127.0.0.1]", Decision.DOMAIN_NOT_ALLOWED),
        ('"john doe"@example.com', Decision.ALLOWED),
    ],
)
def test_relay_tricks_and_malformed_addresses_are_refused(address: str, decision: Decision) -> None:
    assert check_address(address, allow("example.com")).decision is decision


@pytest.mark.parametrize("patterns", [[], [" ", ""], ["exa mple.com"], ["*.*.com"], ["ex*ample.com"], ["-bad.com"]])
def test_invalid_or_empty_allowlists_are_errors(patterns: list[str]) -> None:
    with pytest.raises(PolicyError):
        DomainAllowlist.parse(patterns)


def test_recipient_null_address_is_malformed_not_null_sender() -> None:
    policy = RelayPolicy(allow("example.com"), allow("example.com"))
    assert policy.check_recipient("<>").decision is Decision.MALFORMED
    assert policy.check_sender("<>").decision is Decision.NULL_SENDER


@given(local, domain)
def test_listed_domain_always_allows_its_addresses(lp: str, dom: str) -> None:
    assert check_address(f"{lp}@{dom}", allow(dom)).allowed
    assert check_address(f"{lp}@{dom.upper()}.", allow(dom)).allowed


@given(local, domain, domain)
def test_suffix_tricks_never_match(lp: str, dom: str, evil: str) -> None:
    lst = allow(dom)
    assert not check_address(f"{lp}@{dom}.{evil}", lst).allowed
    assert not check_address(f"{lp}@{evil}{dom}", lst).allowed or evil + dom == dom


@given(local, domain, label)
def test_wildcard_matches_every_subdomain_but_not_parent(lp: str, dom: str, sub: str) -> None:
    lst = allow(f"*.{dom}")
    assert check_address(f"{lp}@{sub}.{dom}", lst).allowed
    assert not check_address(f"{lp}@{dom}", lst).allowed


@given(local, domain, domain)
def test_unlisted_domain_is_refused_with_its_name(lp: str, listed: str, other: str) -> None:
    verdict = check_address(f"{lp}@{other}", allow(listed))
    assert verdict.allowed == (other == listed)
    if not verdict.allowed:
        assert verdict.decision is Decision.DOMAIN_NOT_ALLOWED
        assert verdict.domain == other


@given(local, domain, st.sampled_from("%!"), domain)
def test_percent_and_bang_routing_never_pass(lp: str, dom: str, trick: str, target: str) -> None:
    assert check_address(f"{lp}{trick}{target}@{dom}", allow("*")).decision is Decision.ROUTING


@given(st.text(max_size=40))
def test_any_text_gets_a_verdict_without_crashing(text: str) -> None:
    verdict = check_address(text, allow("example.com"))
    if verdict.allowed:
        assert text.rpartition("@")[2].rstrip(".").lower() in {"example.com"}


@given(st.text(max_size=30))
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize_domain(text)
    if once is not None:
        assert normalize_domain(once) == once


_SHARED_POLICY = RelayPolicy(allow("example.com", "*.example.org"), allow("example.net"))


@given(st.lists(st.one_of(st.text(max_size=30), st.builds("{}@{}".format, local, domain)), max_size=20))
def test_remembered_verdicts_equal_fresh_ones(addresses: list[str]) -> None:
    # One policy across examples: the second and later look-ups of an address come from its cache.
    policy = _SHARED_POLICY
    for address in addresses + addresses:
        fresh = RelayPolicy(policy.senders, policy.recipients)
        assert policy.check_sender(address) == fresh.check_sender(address)
        assert policy.check_recipient(address) == fresh.check_recipient(address)


def test_verdict_cache_stays_bounded() -> None:
    policy = RelayPolicy(allow("example.com"), allow("example.com"))
    for n in range(VERDICT_CACHE_SIZE * 3):
        assert policy.check_recipient(f"user{n}@example.com").allowed
        assert not policy.check_sender(f"user{n}@evil.example").allowed
    assert len(policy._recipient_verdicts) <= VERDICT_CACHE_SIZE
    assert len(policy._sender_verdicts) <= VERDICT_CACHE_SIZE


# -- SMTPUTF8 local parts (RFC 6531) ----------------------------------------------------------------------------
UTF8_LIST = DomainAllowlist.parse(["example.com", "xn--bcher-kva.example"])


@pytest.mark.parametrize("address", ["josé@example.com", "δοκ@bücher.example", "用户@xn--bcher-kva.example"])
def test_utf8_local_parts_of_listed_domains_are_allowed(address: str) -> None:
    assert check_address(address, UTF8_LIST).allowed


@pytest.mark.parametrize(
    ("address", "decision"),
    [
        ("a\uff05b@example.com", Decision.ROUTING),  # fullwidth %: `a%b` once NFKC-normalised
        ("a\uff01b@example.com", Decision.ROUTING),  # fullwidth !
        ("a\uff20evil.test@example.com", Decision.ROUTING),  # fullwidth @
        ("a\u202eb@example.com", Decision.MALFORMED),  # right-to-left override
        ("a\u00a0b@example.com", Decision.MALFORMED),  # no-break space
        ("a\u2028b@example.com", Decision.MALFORMED),  # line separator
        ("a\x85b@example.com", Decision.MALFORMED),  # NEL, a C1 control
        ("a\udcffb@example.com", Decision.MALFORMED),  # a byte that was not UTF-8 (surrogateescape)
        ("a\ue000b@example.com", Decision.MALFORMED),  # private use
        ("b\u200b@example.com", Decision.MALFORMED),  # zero-width space: invisible
        ('"a b\uff20evil.test"@example.com', Decision.ROUTING),  # fullwidth @, quoted
        ('"a b\ufe6b"@example.com', Decision.ROUTING),  # small @, quoted
        ('"x y\uff3c"@example.com', Decision.ROUTING),  # fullwidth backslash, quoted
        ('"a \uff02b"@example.com', Decision.ROUTING),  # fullwidth quote, quoted
    ],
)
def test_utf8_local_parts_that_hide_routing_or_are_not_text_are_refused(address: str, decision: Decision) -> None:
    assert check_address(address, UTF8_LIST).decision is decision


@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFFFF), min_size=1, max_size=12),
    quoted=st.booleans(),
)
def test_no_utf8_local_part_passes_whose_compatibility_form_routes(text: str, quoted: bool) -> None:
    lp = f'"{text}"' if quoted else text
    verdict = check_address(f"{lp}@example.com", UTF8_LIST)
    if verdict.allowed:
        for ch in text:
            assert ch.isascii() or not set('%!@"\\') & set(unicodedata.normalize("NFKC", ch)), lp


@pytest.mark.parametrize(
    "address",
    [
        "u@exam\u200cple.com",  # IDNA 2003 drops the joiner: example.com; IDNA 2008 keeps it: another domain
        "u@fa\u00df\u200d.de",  # IDNA 2003: fass.de
        "u@\u03c2\u200d.gr",  # IDNA 2003: the final sigma becomes a sigma
        "u@\u2066evil\u2069.sub.example",  # bidi isolates, unassigned in IDNA 2003's Unicode
        "u@\u2603\u1806.com",  # IDNA 2003 drops the Mongolian soft hyphen: the snowman's domain to it
        "u@fu\u1e9eball.de",  # capital sharp s: fußball.de to UTS 46 now, fussball.de to ICU
    ],
)
def test_domains_that_implementations_read_as_different_domains_are_malformed(address: str) -> None:
    listed = ["example.com", "fass.de", "xn--4xa.gr", "*.sub.example", "xn--n3h.com", "fussball.de", "fußball.de"]
    allowlist = DomainAllowlist.parse(listed)
    assert check_address(address, allowlist).decision is Decision.MALFORMED


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("u@\u2603.com", "xn--n3h.com"),  # IDNA 2008 disallows the snowman; IDNA 2003, as everyone, takes it
        ("u@\u2603\ufe0f.com", "xn--n3h.com"),  # a variation selector, which UTS 46 ignores
        ("u@\u0cb5\u0cf3.example.org", "xn--ktc8j.example.org"),  # Unicode 15, newer than this Python's data
        ("u@\U0001fae8.example.org", "xn--929h.example.org"),
    ],
)
def test_domains_every_implementation_reads_alike_are_taken(address: str, domain: str) -> None:
    verdict = check_address(address, DomainAllowlist.parse(["xn--n3h.com", "*.example.org"]))
    assert verdict.allowed and verdict.domain == domain


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("rcpt@example.com", "rcpt@example.com"),
        ("rcpt@bücher.example", "rcpt@xn--bcher-kva.example"),
        ("Rcpt@BÜCHER.example", "Rcpt@xn--bcher-kva.example"),
        ("josé@example.com", None),  # a non-ASCII local part has no ASCII form
    ],
)
def test_ascii_address_turns_domains_into_a_labels_only(address: str, expected: str | None) -> None:
    assert ascii_address(address) == expected
