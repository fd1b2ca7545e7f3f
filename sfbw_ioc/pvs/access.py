"""EPICS access security for the caproto server: an ACF file decides who may read and write.

The file is read the way EPICS base's asLib reads it (``asLib_lex.l``, ``asLib.y``,
``asLibRoutines.c``), for the subset ``UAG``, ``HAG`` and ``ASG`` with
``RULE(level, NONE|READ|WRITE[, TRAPWRITE|NOTRAPWRITE])`` and ``UAG(...)``/``HAG(...)``
conditions; anything else (``INPx``, ``CALC``, ``RPC``, ``METHOD``, ...) is an error, so
that a rule is never silently different from what its author meant.

As in asLib:
- a rule applies to a client when the PV's access security level (ASL) is at most the
  rule's level, its user is in one of the rule's UAGs (if it names any) and its host is
  in one of the rule's HAGs (if it names any); the client gets the most permissive
  access of the rules that apply (``NONE`` takes nothing away); WRITE includes READ;
- a client no rule applies to has no access at all: not even READ (a file that means
  everybody to read says so with ``RULE(1, READ)``, as db/sfbw.acf does);
- user names compare exactly, host names case-insensitively (asLib lowercases both the
  HAG's hosts and the client's host); the host is the name the client sends;
- a PV of an ASG the file does not define belongs to ``DEFAULT``, which always exists
  (without rules, if the file has none for it: then nobody may read those PVs).

caproto has no field ASLs: every PV and field is ASL 0 here, so rules of every level
apply to it. The server enforces READ for reads and monitors (``pvs.ca_server``).
"""
from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from caproto import AccessRights

log = logging.getLogger(__name__)

CONTROL = "CONTROL"
DEFAULT = "DEFAULT"
# caproto's PVs carry no access security level of their own.
PV_LEVEL = 0


class AccessConfigError(ValueError):
    """The ACF text is not valid; ``line`` is where (1-based)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason


class Access(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2

    @property
    def rights(self) -> AccessRights:
        return {Access.NONE: AccessRights.NO_ACCESS, Access.READ: AccessRights.READ,
                Access.WRITE: AccessRights.READ | AccessRights.WRITE}[self]


@dataclass(frozen=True, slots=True)
class Rule:
    level: int
    access: Access
    uags: tuple[str, ...]  # empty: any user
    hags: tuple[str, ...]  # empty: any host
    line: int
    trap_write: bool = False  # accepted for compatibility; writes are not trapped here


@dataclass(frozen=True, slots=True)
class AccessConfig:
    uags: Mapping[str, frozenset[str]]
    hags: Mapping[str, frozenset[str]]  # host names in lower case
    asgs: Mapping[str, tuple[Rule, ...]]

    def rights(self, asg: str, host: str | None, user: str | None,
               level: int = PV_LEVEL) -> AccessRights:
        """What a client (``host``, ``user``) may do with a PV of ``asg``."""
        rules = self.asgs.get(asg, self.asgs[DEFAULT])
        host = (host or "").lower()
        applying = [rule.access for rule in rules
                    if level <= rule.level and self._in(rule, host, user or "")]
        return max(applying).rights if applying else AccessRights.NO_ACCESS

    def _in(self, rule: Rule, host: str, user: str) -> bool:
        return ((not rule.uags or any(user in self.uags[name] for name in rule.uags))
                and (not rule.hags or any(host in self.hags[name] for name in rule.hags)))


# ---- applying it to a caproto pvdb ---------------------------------------------------

class _Guard:
    """A PV's ``check_access`` under the ACF: its own rights (a read-only PV stays
    read-only) narrowed by those of its ASG. caproto asks ``check_access`` when a client
    creates a channel (the rights it sends to the client) and again on every read and
    write (``auth_read``/``auth_write``: a refused write never reaches the putter); the
    server of ``pvs.ca_server`` asks it for every read and subscription too."""

    def __init__(self, own, config: AccessConfig, asg: str) -> None:
        self._own = own
        self._config = config
        self.asg = asg

    def __call__(self, hostname: str | None, username: str | None) -> AccessRights:
        return self._own(hostname, username) & self._config.rights(self.asg, hostname,
                                                                   username)


def apply(config: AccessConfig, pvdb: Mapping[str, object]) -> None:
    """Put every PV of ``pvdb`` (and its record fields) under ``config``: those a client
    may write to ``CONTROL``, all others to ``DEFAULT``. Call it before the server
    starts; it covers whatever the pvdb holds then (SubGroups' PVs included)."""
    counts = {CONTROL: 0, DEFAULT: 0}
    for pv in {id(pv): pv for pv in pvdb.values()}.values():
        if isinstance(pv.check_access, _Guard):  # a field caproto cached in the pvdb
            continue
        # A record's fields belong to its ASG, as in EPICS: a field such as .PROC acts
        # on the record (caproto's PROC writes the value again, running the putter).
        asg = CONTROL if AccessRights.WRITE in pv.check_access(None, None) else DEFAULT
        counts[asg] += 1
        for channel in (pv, *getattr(pv, "fields", {}).values()):
            channel.check_access = _Guard(channel.check_access, config, asg)
    unused = sorted(set(config.asgs) - {CONTROL, DEFAULT})
    if unused:
        log.warning("access security: ASG %s not used (PVs are in CONTROL or DEFAULT)",
                    ", ".join(unused))
    if CONTROL not in config.asgs:
        log.warning("access security: no ASG CONTROL, control PVs follow DEFAULT")
    log.info("access security: %d control PVs in CONTROL, %d others in DEFAULT",
             counts[CONTROL], counts[DEFAULT])


def load(path: Path) -> AccessConfig:
    """Parse the ACF file at ``path`` (AccessConfigError, OSError)."""
    return parse(Path(path).read_text(encoding="utf-8"))


# ---- the ACF language ----------------------------------------------------------------

_NAME_CHARS = r"[A-Za-z0-9_\-+:.\[\]<>;]"
_TOKEN = re.compile(rf"""
    (?P<newline>\n)
  | (?P<space>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<quoted>"(?:[^"\n\\]|\\.)*")
  | (?P<bad_quoted>"(?:[^"\n\\]|\\.)*)
  | (?P<word>{_NAME_CHARS}+)
  | (?P<punct>[(){{}},])
""", re.VERBOSE)
_KEYWORDS = {"UAG", "HAG", "ASG", "RULE", "CALC", "METHOD", "AUTHORITY", "PROTOCOL"}
_INP = re.compile(r"INP[A-U]")
_INTEGER = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?[0-9]*\.[0-9]+([eE][-+]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # keyword, integer, float, name, punct, end
    text: str
    line: int


def _tokens(text: str) -> Iterator[_Token]:
    line, position = 1, 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise AccessConfigError(line, f"invalid character {text[position]!r}")
        kind, value = match.lastgroup, match.group()
        position = match.end()
        if kind == "newline":
            line += 1
        elif kind == "bad_quoted":
            raise AccessConfigError(line, "newline in quoted string, closing quote missing")
        elif kind == "quoted":
            # asLib keeps a quoted string's backslashes as they are.
            yield _Token("name", value[1:-1], line)
        elif kind == "word":
            yield _Token(_word_kind(value), value, line)
        elif kind == "punct":
            yield _Token("punct", value, line)
    yield _Token("end", "end of file", line)


def _word_kind(word: str) -> str:
    if word in _KEYWORDS or _INP.fullmatch(word):
        return "keyword"
    if _INTEGER.fullmatch(word):
        return "integer"
    if _FLOAT.fullmatch(word):
        return "float"
    return "name"


def parse(text: str) -> AccessConfig:
    """Parse ACF text; AccessConfigError (with the line) when it is not valid."""
    return _Parser(text).config()


class _Parser:
    """Recursive descent over asLib's grammar, restricted to the supported subset."""

    def __init__(self, text: str) -> None:
        self._tokens = _tokens(text)
        self._token = next(self._tokens)
        self._uags: dict[str, frozenset[str]] = {}
        self._hags: dict[str, frozenset[str]] = {}
        self._asgs: dict[str, tuple[Rule, ...]] = {}

    def config(self) -> AccessConfig:
        if self._token.kind == "end":
            raise AccessConfigError(self._token.line, "no UAG, HAG or ASG in the file")
        while self._token.kind != "end":
            keyword = self._keyword("UAG, HAG or ASG", ("UAG", "HAG", "ASG"))
            {"UAG": self._uag, "HAG": self._hag, "ASG": self._asg}[keyword]()
        return AccessConfig(self._uags, self._hags,
                            {DEFAULT: (), **self._asgs})

    # -- top-level items

    def _uag(self) -> None:
        name = self._head(self._uags, "UAG")
        self._uags[name] = frozenset(self._optional_list())

    def _hag(self) -> None:
        name = self._head(self._hags, "HAG")
        self._hags[name] = frozenset(host.lower() for host in self._optional_list())

    def _asg(self) -> None:
        name = self._head(self._asgs, "ASG")
        rules: list[Rule] = []
        if self._accept("{"):
            while True:
                rules.append(self._rule())
                if self._accept("}"):
                    break
        self._asgs[name] = tuple(rules)

    def _head(self, defined: Mapping[str, object], what: str) -> str:
        line = self._token.line
        self._expect("(")
        name = self._name(f"{what} name")
        self._expect(")")
        if name in defined:
            raise AccessConfigError(line, f"duplicate {what} {name!r}")
        return name

    def _optional_list(self) -> list[str]:
        if not self._accept("{"):
            return []
        return self._names("}")

    # -- rules

    def _rule(self) -> Rule:
        line = self._token.line
        self._keyword("RULE", ("RULE",))
        self._expect("(")
        level = self._level()
        self._expect(",")
        access = self._access()
        trap_write = False
        if self._accept(","):
            trap_write = self._trap_option()
        self._expect(")")
        uags: list[str] = []
        hags: list[str] = []
        if self._accept("{"):
            self._condition(uags, hags)
            while not self._accept("}"):
                self._condition(uags, hags)
        return Rule(level, access, tuple(uags), tuple(hags), line, trap_write)

    def _level(self) -> int:
        token = self._token
        if token.kind != "integer":
            raise AccessConfigError(token.line, f"RULE level must be an integer, "
                                                f"not {token.text!r}")
        self._advance()
        if int(token.text) < 0:
            raise AccessConfigError(token.line, f"RULE level must be 0 or more: "
                                                f"{token.text}")
        return int(token.text)

    def _access(self) -> Access:
        token = self._token
        word = self._name("RULE access")
        try:
            return Access[word]
        except KeyError:
            raise AccessConfigError(token.line, f"RULE access must be NONE, READ or WRITE, "
                                                f"not {word!r}") from None

    def _trap_option(self) -> bool:
        token = self._token
        option = self._name("TRAPWRITE or NOTRAPWRITE")
        if option not in ("TRAPWRITE", "NOTRAPWRITE"):
            raise AccessConfigError(token.line, f"log option must be TRAPWRITE or "
                                                f"NOTRAPWRITE, not {option!r}")
        return option == "TRAPWRITE"

    def _condition(self, uags: list[str], hags: list[str]) -> None:
        keyword = self._keyword("UAG or HAG", ("UAG", "HAG"))
        groups, defined = (uags, self._uags) if keyword == "UAG" else (hags, self._hags)
        self._expect("(")
        line = self._token.line
        for name in self._names(")"):
            if name not in defined:
                raise AccessConfigError(line, f"no {keyword} named {name!r} defined")
            groups.append(name)

    # -- tokens

    def _names(self, closing: str) -> list[str]:
        """``name (, name)*`` and the closing bracket."""
        names = [self._name("a name")]
        while not self._accept(closing):
            self._expect(",")
            names.append(self._name("a name"))
        return names

    def _name(self, what: str) -> str:
        token = self._token
        if token.kind != "name":
            raise AccessConfigError(token.line, f"expected {what}, found {token.text!r}")
        self._advance()
        return token.text

    def _keyword(self, what: str, allowed: tuple[str, ...]) -> str:
        token = self._token
        if token.kind == "keyword" and token.text in allowed:
            self._advance()
            return token.text
        if token.kind == "keyword":
            raise AccessConfigError(token.line, f"{token.text} is not supported here "
                                                f"(supported: {what})")
        raise AccessConfigError(token.line, f"expected {what}, found {token.text!r}")

    def _expect(self, punct: str) -> None:
        if not self._accept(punct):
            raise AccessConfigError(self._token.line,
                                    f"expected {punct!r}, found {self._token.text!r}")

    def _accept(self, punct: str) -> bool:
        if self._token.kind == "punct" and self._token.text == punct:
            self._advance()
            return True
        return False

    def _advance(self) -> None:
        self._token = next(self._tokens)
