"""The fast path for plain `<local@domain>` addresses gives exactly what aiosmtpd's own parser gives."""

from __future__ import annotations

from aiosmtpd.smtp import SMTP
from hypothesis import given
from hypothesis import strategies as st

from smtp_relay.protocol import _SIMPLE_ANGLE_ADDR, RelaySMTP

atom = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}", fullmatch=True)
local = st.lists(atom, min_size=1, max_size=3).map(".".join)
label = st.from_regex(r"[A-Za-z0-9-]{1,8}", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=3).map(".".join)
params = st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SIZE=5", "  "])


class _Library(SMTP):
    def __init__(self) -> None:  # only the address parser is used: no event loop, no handler
        self.local_part_limit = 0


class _Relay(RelaySMTP):
    def __init__(self) -> None:
        self.local_part_limit = 0


@given(local, domain, params)
def test_fast_path_matches_the_library_parser(lp: str, dom: str, rest: str) -> None:
    arg = f"<{lp}@{dom}>{rest}"
    assert _SIMPLE_ANGLE_ADDR.match(arg) is not None  # the fast path is taken
    assert _Relay()._getaddr(arg) == _Library()._getaddr(arg)


def test_unusual_forms_are_left_to_the_library_parser() -> None:
    for arg in [
        '<"quoted"@example.com>',
        "<@hop:a@example.com>",
        "<>",
        "a@example.com",
        "<a@example.com.>",
        "<a..b@example.com>",
        "<a@[127.0.0.1]>",
        "<a b@example.com>",
        "<a@exa_mple.com>",
    ]:
        assert _SIMPLE_ANGLE_ADDR.match(arg) is None, arg
