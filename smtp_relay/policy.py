"""Pure relay policy: which envelope senders and recipients may pass. No I/O, no SMTP replies."""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field

import idna

WILDCARD = "*"


class PolicyError(ValueError):
    """A domain pattern in an allowlist is not a valid domain or wildcard."""


class Decision(enum.Enum):
    """Why an address was accepted or refused; the handler maps each to a reply."""

    ALLOWED = "allowed"
    NULL_SENDER = "null_sender"
    MALFORMED = "malformed"
    ROUTING = "routing"
    DOMAIN_NOT_ALLOWED = "domain_not_allowed"


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    domain: str

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOWED


def normalize_domain(domain: str) -> str | None:
    """Canonical ASCII form of a domain (lower case, A-labels, no trailing dot); None if not a domain.

    Both U-labels (bücher.example) and A-labels (xn--bcher-kva.example) map to the same form, so
    either spelling in a list matches either spelling in an address. IDNA 2008 with UTS 46 mapping, without its
    transitional rules (as browsers and registries do): faß.de is xn--fa-hia.de, a domain of its own, not fass.de,
    which Python's built-in IDNA 2003 codec would make of it.
    """
    domain = domain.strip()
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or len(domain) > 253:
        return None
    labels = []
    for label in domain.split("."):
        if not label:
            return None
        converted = label.lower() if label.isascii() else _a_label(label)
        if converted is None:
            return None
        ascii_label = converted
        if len(ascii_label) > 63 or not _is_ldh(ascii_label):
            return None
        if ascii_label.startswith("xn--") and not _well_formed_a_label(ascii_label):
            return None
        labels.append(ascii_label)
    return ".".join(labels)


# Capital sharp s: UTS 46 now maps it to ß (a domain of its own), older tables and ICU (which Postfix uses) to
# "ss". An upstream could route `fuẞball.de` to fussball.de while the relay checked fußball.de: refused.
_AMBIGUOUS = "\u1e9e"


def _a_label(label: str) -> str | None:
    """The A-label of a U-label: IDNA 2008 (UTS 46, not transitional); for a name IDNA 2008 does not allow
    (symbols such as ☃, registered under IDNA 2003 and still in use), IDNA 2003 as before, but only where IDNA
    2003 reads the label as UTS 46 maps it: the domain the relay checks must be the one an upstream, which gets
    the label as written, routes to (IDNA 2003 turns faß into fass, drops joiners and some hyphens)."""
    if _AMBIGUOUS in label:
        return None
    try:
        return idna.encode(label, uts46=True, transitional=False).decode("ascii")
    except UnicodeError:  # idna.IDNAError is one
        pass
    if not is_clean_text(label):
        return None
    try:
        mapped = idna.uts46_remap(label, std3_rules=False, transitional=False)
        a_label = label.encode("idna")
        if a_label.decode("idna") != mapped.lower():
            return None
        return a_label.decode("ascii").lower()
    except UnicodeError:
        return None


def _well_formed_a_label(label: str) -> bool:
    """An `xn--` label whose Punycode decodes and encodes back to itself. Which code points a registry allows is
    not the relay's business: a name that resolves is a name."""
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        return bool(decoded) and "xn--" + decoded.encode("punycode").decode("ascii") == label
    except UnicodeError:
        return False


def _is_ldh(label: str) -> bool:
    """Letters, digits, hyphen; not starting or ending with a hyphen (underscore allowed for SRV-ish names)."""
    if label[0] == "-" or label[-1] == "-":
        return False
    return all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in label)


@dataclass(frozen=True, slots=True)
class DomainAllowlist:
    """A parsed allowlist: exact domains, parent domains of `*.` patterns, or everything (`*`)."""

    exact: frozenset[str]
    parents: frozenset[str]
    allow_all: bool

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> DomainAllowlist:
        exact: set[str] = set()
        parents: set[str] = set()
        allow_all = False
        for raw in patterns:
            pattern = raw.strip()
            if not pattern:
                continue
            if pattern == WILDCARD:
                allow_all = True
            elif pattern.startswith("*."):
                parent = normalize_domain(pattern[2:])
                if parent is None:
                    raise PolicyError(f"invalid domain pattern {raw.strip()!r}")
                parents.add(parent)
            else:
                domain = normalize_domain(pattern)
                if domain is None or "*" in pattern:
                    raise PolicyError(f"invalid domain pattern {raw.strip()!r}")
                exact.add(domain)
        if not (exact or parents or allow_all):
            raise PolicyError("the list is empty")
        return cls(frozenset(exact), frozenset(parents), allow_all)

    def matches(self, domain: str) -> bool:
        """True if the (already normalized) domain is allowed; `*.x` matches subdomains of x only."""
        if self.allow_all or domain in self.exact:
            return True
        if not self.parents:
            return False
        rest = domain
        while True:
            _, dot, rest = rest.partition(".")
            if not dot:
                return False
            if rest in self.parents:
                return True

    def describe(self) -> str:
        """Human-readable form for --check-config and start-up logs."""
        items = sorted(self.exact) + sorted(f"*.{p}" for p in self.parents)
        if self.allow_all:
            items.insert(0, WILDCARD)
        return ",".join(items)


_FORBIDDEN_LOCAL = frozenset("%!")
# Characters that a compatibility character may stand for (NFKC) and that route or quote in a local part.
_ROUTING_IN_FOLDED = frozenset('%!@"\\')
# Never in an address: controls, format characters (invisible, or reordering text: bidi controls), lone surrogates
# (bytes that were not UTF-8), private code points, and spaces and separators other than ASCII's. (Not the code
# points this Python's Unicode data does not know yet: IDNA 2008, with newer data, judges those in a domain.)
_NOT_TEXT = frozenset({"Cc", "Cf", "Cs", "Co", "Zs", "Zl", "Zp"})
# Joiners: format characters that some scripts need, which IDNA 2008 allows in a domain only where they belong.
_JOINERS = frozenset("\u200c\u200d")


def is_clean_text(text: str) -> bool:
    """No ASCII control (a tab aside) and, beyond ASCII, nothing that is not visible text (see `_NOT_TEXT`)."""
    for ch in text:
        if ch < "\x80":
            if (ch < " " and ch != "\t") or ch == "\x7f":
                return False
        elif unicodedata.category(ch) in _NOT_TEXT and ch not in _JOINERS:
            return False
    return True


def _local_part_problem(local: str) -> Decision | None:
    """For a non-ASCII local part: MALFORMED for characters that are not text, ROUTING for a character beyond
    ASCII whose compatibility form (NFKC, as a receiving system may apply) is or holds a routing or quoting
    character, quoted or not: the fullwidth percent sign (U+FF05) is `%`, U+FF20 is `@`."""
    if not is_clean_text(local):
        return Decision.MALFORMED
    for ch in local:
        if ch >= "\x80" and _ROUTING_IN_FOLDED.intersection(unicodedata.normalize("NFKC", ch)):
            return Decision.ROUTING
    return None


def split_address(address: str) -> tuple[str, str] | None:
    """Split local@domain at the last @; None if there is no domain or the address has control characters."""
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in address):
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def check_address(address: str, allowlist: DomainAllowlist) -> Verdict:
    """Decide one envelope address against an allowlist.

    Refuses relay tricks before looking at the domain: `%` and `!` routing in the local part,
    source routes, quoted local parts that hide another address, and domain literals.
    """
    if not address or address == "<>":
        return Verdict(Decision.NULL_SENDER, "")
    if address.startswith("@") or address.startswith("<"):
        return Verdict(Decision.ROUTING, "")
    parts = split_address(address)
    if parts is None:
        return Verdict(Decision.MALFORMED, "")
    local, raw_domain = parts
    if _FORBIDDEN_LOCAL.intersection(local):
        return Verdict(Decision.ROUTING, raw_domain)
    if not local.isascii():
        problem = _local_part_problem(local)
        if problem is not None:
            return Verdict(problem, raw_domain)
    if local.startswith('"'):
        inner = local[1:-1] if local.endswith('"') and len(local) >= 2 else None
        if inner is None or "@" in inner or "\\" in inner:
            return Verdict(Decision.ROUTING, raw_domain)
    elif "@" in local or '"' in local:
        return Verdict(Decision.MALFORMED, raw_domain)
    if raw_domain.startswith("["):
        return Verdict(Decision.DOMAIN_NOT_ALLOWED, raw_domain)
    domain = normalize_domain(raw_domain)
    if domain is None:
        return Verdict(Decision.MALFORMED, raw_domain)
    if not allowlist.matches(domain):
        return Verdict(Decision.DOMAIN_NOT_ALLOWED, domain)
    return Verdict(Decision.ALLOWED, domain)


def ascii_address(address: str) -> str | None:
    """The same address in ASCII, for an upstream without SMTPUTF8: the domain as A-labels (the same domain, RFC
    5890); None if the local part is not ASCII, which has no ASCII form."""
    parts = split_address(address)
    if parts is None or not parts[0].isascii():
        return None
    domain = parts[1] if parts[1].isascii() else normalize_domain(parts[1])
    return None if domain is None else f"{parts[0]}@{domain}"


# Verdicts remembered per policy: applications send from and to the same few addresses over and over.
VERDICT_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class RelayPolicy:
    """The sender and recipient allowlists together; verdicts are remembered (bounded, pure functions)."""

    senders: DomainAllowlist
    recipients: DomainAllowlist
    _sender_verdicts: dict[str, Verdict] = field(default_factory=dict, init=False, repr=False, compare=False)
    _recipient_verdicts: dict[str, Verdict] = field(default_factory=dict, init=False, repr=False, compare=False)

    def check_sender(self, address: str) -> Verdict:
        verdict = self._sender_verdicts.get(address)
        if verdict is None:
            verdict = check_address(address, self.senders)
            _remember(self._sender_verdicts, address, verdict)
        return verdict

    def check_recipient(self, address: str) -> Verdict:
        verdict = self._recipient_verdicts.get(address)
        if verdict is None:
            verdict = check_address(address, self.recipients)
            if verdict.decision is Decision.NULL_SENDER:
                verdict = Verdict(Decision.MALFORMED, "")
            _remember(self._recipient_verdicts, address, verdict)
        return verdict


def _remember(cache: dict[str, Verdict], address: str, verdict: Verdict) -> None:
    if len(cache) >= VERDICT_CACHE_SIZE:
        cache.clear()  # hostile clients cycling addresses cost a recomputation, never unbounded memory
    cache[address] = verdict
