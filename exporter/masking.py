"""Masking credentials in command lines before they leave the host.

Command lines routinely carry secrets (`--password=…`, `PGPASSWORD=…`, `https://u:p@host`,
`mysql -pSECRET`). The masker replaces each secret value with `***` and keeps the rest.

Built-in rules (see docs/api.md and SECURITY.md for the guarantees):

* generic, in any argument: `NAME=value`, `NAME: value`, `"NAME":"value"` and
  `--NAME<TAB>value` where NAME names a credential (password, passwd, pass, pwd, secret,
  token, api key, access/private/session key, credential, signature, sig, auth, cookie…);
  the value is the rest of the line when NAME starts its line (`--password=a b`,
  `password: x`, `X-API-Key: x`), else it ends at `&`, `,`, `;`, whitespace or its closing
  quote (`?api_key=x&a=1`, `{"password": "x"}`); the userinfo of URLs
  (`https://user:***@h`, `https://***@h`); `Bearer x`, `Basic x`, `token x`;
* `--NAME value`: a credential flag masks the whole next argument;
* per program, wherever the program starts a command (argv[0], after `sudo`/`env`/`ssh`…,
  or inside a shell string such as `bash -c "…"`): mysql/mariadb clients (`-pSECRET`,
  `--pass=`…), redis-cli and friends (`-a x`, `AUTH x`), sshpass (`-p x`, `-pX`),
  curl (`-u user:***`, `-U`, `-E cert:***`, `--oauth2-bearer`); wget's, psql's and git's
  forms (`--http-password`, headers, URLs, conninfo strings) fall under the generic rules.

Every built-in rule runs in time linear in the length of the command line: scanning is done
by regexes without nested or backtracking-prone quantifiers (runs are matched possessively
from their first character only), and the rest is a single pass over tokens. The per-item
Python work (arguments, shell words, URLs, credential-word candidates) is capped at
`WORK_BUDGET` units per command line; past it the masker fails closed (`Budget` says how),
so the worst 128 KiB argument costs ~10 ms of CPU, whatever its shape.

User patterns (`masking.patterns`, `extra_patterns`) are ordinary regexes, so they get two
limits instead: `check_pattern` refuses nested quantifiers and backreferences (the causes of
exponential backtracking), and each is applied only to the first `USER_PATTERN_SPAN`
characters of an argument and `USER_PATTERN_BUDGET` characters of a command line.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MASK = "***"

# User patterns are arbitrary backtracking regexes; these bound what one may cost.
USER_PATTERN_SPAN = 1024  # characters of one argument a user pattern sees
USER_PATTERN_BUDGET = 16 * 1024  # characters of one command line user patterns see in all
USER_FLAG_SPAN = 256  # a longer argument is not a flag; user flag regexes skip it
# Shell strings nest (`bash -c "sh -c '…'"`); each level costs one more linear pass.
SHELL_DEPTH = 3
# Units of per-item Python work one command line gets: each argument, each word of a shell
# string, each URL and each credential-word candidate (`pw`, `key`…) examined costs one,
# a few to a few tens of microseconds. The regex scans are linear, so this bounds the
# whole: a hostile `pw=a&pw=a&…` (32K keys in 128 KiB), `bash -c "<64K words>"` or 64K
# arguments cost at most WORK_BUDGET units. Past it the masker fails closed: see `Budget`.
WORK_BUDGET = 1024


_Span = tuple[int, int]

# -- what names a credential ---------------------------------------------------------------

# Substrings of a name (lowercased, without - _ .) that make it a credential name.
_SECRET_PARTS = ("password", "passwd", "passphrase", "secret", "token", "apikey", "accesskey",
                 "privatekey", "credential", "signature", "sessionkey", "sessionid",
                 "requirepass", "masterauth", "authorization", "cookie")
# Whole segments (split at - _ .) that make it one: MYSQL_PWD, --pass, db-pw.
_SECRET_SEGMENTS = frozenset({"pass", "pwd", "pw", "passwd"})
# A last segment that makes it one: --auth, --basic-auth, sig= (but not --auth-required).
_SECRET_LAST = frozenset({"auth", "sig"})
# Names that mention a credential without carrying one: --password-file, --ask-password,
# --no-password, --max-tokens.
_HARMLESS_FIRST = frozenset({"ask", "no", "max", "min", "num"})
_HARMLESS_LAST = frozenset({"file", "fd", "stdin", "prompt", "env", "required", "length",
                            "len", "count", "tokens", "policy"})
# Cheap prefilter: a name holding none of these is never a credential name.
_CANDIDATE = r"(?:pass|pw|secret|token|key|credential|sig|auth|session|cookie)"
_SEGMENT_SPLIT = re.compile(r"[-_.]")


def is_secret_name(name: str) -> bool:
    """Whether an option or key name (`--db-password`, `MYSQL_PWD`, `X-Api-Key`) names a secret."""
    return _is_secret_short(name) if len(name) <= 64 else _is_secret(name)


@functools.lru_cache(maxsize=4096)  # names repeat; bounded in count and (<= 64 chars) size
def _is_secret_short(name: str) -> bool:
    return _is_secret(name)


def _is_secret(name: str) -> bool:
    low = name.lower().lstrip("-")
    segments = _SEGMENT_SPLIT.split(low)
    if segments[0] in _HARMLESS_FIRST or segments[-1] in _HARMLESS_LAST:
        return False
    flat = low.replace("-", "").replace("_", "").replace(".", "")
    if any(part in flat for part in _SECRET_PARTS):
        return True
    return segments[-1] in _SECRET_LAST or not _SECRET_SEGMENTS.isdisjoint(segments)


# -- generic rules over one text -----------------------------------------------------------

_NAME = r"[\w.-]"
# Scanning is driven by C-speed substring search in the lowercased text: a credential word
# is found first, then the run of name characters around it is matched possessively, once.
# Each run is looked at a bounded number of times, so the whole scan is linear.
_CANDIDATES = ("pass", "pw", "secret", "token", "key", "credential", "sig", "auth", "session",
               "cookie")
_CANDIDATE_RX = re.compile("|".join(_CANDIDATES))  # on lowercased text: no (?i), fast
_RUN = re.compile(rf"{_NAME}*+")
_KEY_AT = re.compile(rf"(?P<key>{_NAME}++)(?P<close>[\"']?)(?P<sep>[ \t]*+[:=]|[ \t]++)")
# Where a line's first name may begin: after dashes, quotes, blanks, and one `NAME=` (so
# that `--header=Authorization: x` and `-Dx.password=y` lead too).
_LINE_LEAD = re.compile(rf"(?m)^(?P<lead>[-\"' \t]*+)(?:{_NAME}++=[\"' \t]*+)?")
_UNQUOTED_VALUE = re.compile(r"[^\s&,;\"'})\]]++")
_DQ_VALUE = re.compile(r'(?:[^"\\\n]++|\\.)*+')
_SQ_VALUE = re.compile(r"[^'\n]*+")
_URL_USERINFO = re.compile(r"(?<![\w+.-])(?P<scheme>[A-Za-z][\w+.-]*+)://(?P<info>[^\s/?#@]*+)@")
_SCHEMES = ("bearer", "basic", "token", "digest")
_AUTH_SCHEME = re.compile(r"(?<![\w-])(?:bearer|basic|token|digest)[ \t]++"
                          r"(?P<value>[\w.~+/=-]++)")  # on lowercased text
_SCHEME_WORD = re.compile(r"(?i)(?:bearer|basic|token|digest|negotiate)[ \t]++")
_TOKEN_IN_USER = frozenset({"http", "https", "git+https", "git+http", "ws", "wss"})


def _lower(text: str) -> str | None:
    """`text` lowercased with every character where it was, or None when that is impossible."""
    low = text.lower()
    return low if len(low) == len(text) else None


def _has_candidate(low: str) -> bool:
    return any(word in low for word in _CANDIDATES)


def _line_leads(text: str, line_start: int) -> dict[int, str]:
    """Where a name leads the line starting at `line_start` -> the quotes opened before it."""
    m = _LINE_LEAD.match(text, line_start)
    assert m is not None  # every part of the pattern is optional
    lead = m.group("lead")
    quotes = "".join(q for q in "\"'" if q in lead)
    ends = {m.end("lead"): quotes}
    if m.end() != m.end("lead"):
        ends[m.end()] = quotes + "".join(q for q in "\"'" if q in m.group(0)[len(lead):])
    return ends


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


class Budget:
    """Units of per-item work left for one command line (see WORK_BUDGET).

    Once spent, the masker fails closed: a text is masked from its next credential word to
    its end; what is left of a shell string is masked whole when it holds a credential word
    or a program with rules; each remaining argument is masked whole when it holds a
    credential word or a URL (and so is the argument after it), and every remaining argument
    is when a program with rules appears in the command line.
    """

    __slots__ = ("left",)

    def __init__(self, left: int = WORK_BUDGET) -> None:
        self.left = left


def text_spans(text: str, budget: Budget | None = None) -> list[_Span]:
    """Spans of `text` the generic rules mask (may overlap; unsorted).

    `budget` is shared by the texts of one command line (a fresh one per call without it).
    """
    if budget is None:
        budget = Budget()
    low = _lower(text)
    if low is None:  # rare scripts whose case folding changes lengths: mask by the original
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    spans: list[_Span] = []
    m: re.Match[str] | None
    if "://" in text:
        for m in _URL_USERINFO.finditer(text):
            budget.left -= 1
            if budget.left < 0:
                spans.append((m.start("info"), len(text)))  # fail closed
                break
            info = m.group("info")
            colon = info.find(":")
            if colon >= 0:
                spans.append((m.start("info") + colon + 1, m.end("info")))
            elif info and m.group("scheme").lower() in _TOKEN_IN_USER:
                spans.append(m.span("info"))  # https://TOKEN@github.com
    if not _has_candidate(low):
        return spans  # the common case, and the cheapest: a few C-speed substring searches
    if any(word in low for word in _SCHEMES):
        spans.extend(m.span("value") for m in _AUTH_SCHEME.finditer(low))
    rev = text[::-1]
    line_start, seen, leads = 0, 0, None  # the current line, scanned up to `seen`
    pos = 0
    while True:
        found = _CANDIDATE_RX.search(low, pos)
        if found is None:
            break
        budget.left -= 1
        if budget.left < 0:
            spans.append((found.start(), len(text)))  # fail closed: too many to look at
            break
        back = len(text) - found.start()  # where the text before the word starts in `rev`
        # _RUN may match nothing, so it always matches: its .match() is never None below.
        run_start = found.start() - (_RUN.match(rev, back).end() - back)  # type: ignore[union-attr]
        m = _KEY_AT.match(text, run_start)
        if m is None:
            pos = _RUN.match(text, found.start()).end() + 1  # type: ignore[union-attr]  # as above
            continue
        start = run_start
        pos = m.end("key")
        if not is_secret_name(m.group("key")):
            continue
        sep = m.group("sep")
        if ":" in sep and (text.startswith("//", m.end())
                           or (start > 0 and text[start - 1] in "/@")):
            continue  # a URL's scheme or host:port, not a name
        newline = text.rfind("\n", seen, start)
        seen = start
        if newline >= 0 or leads is None:
            line_start = newline + 1 if newline >= 0 else line_start
            leads = _line_leads(text, line_start)
        key = m.group("key")
        dashes = len(key) - len(key.lstrip("-"))
        quotes = leads.get(start + dashes)
        vstart = m.end()
        while vstart < len(text) and text[vstart] in " \t":
            vstart += 1
        if quotes is not None and (sep.strip() or dashes):
            # The name leads its line: the value is the rest of it (`--password=a b`,
            # `--password=a&b`, `password: x`), or up to the quote opened before the name.
            end = _line_end(text, vstart)
            for q in quotes:
                close = text.find(q, vstart, end)
                if close >= 0:
                    end = close
            if text.startswith(("'", '"'), vstart) and not quotes:
                vstart += 1
                close = text.find(text[vstart - 1], vstart, end)
                end = close if close >= 0 else end
            scheme = _SCHEME_WORD.match(text, vstart, end)
            if scheme is not None and scheme.end() < end:
                vstart = scheme.end()  # keep `Bearer`, mask the credential after it
        elif not sep.strip():
            continue  # `password x` in running text is prose, not an option
        elif vstart < len(text) and text[vstart] in "\"'":
            vstart += 1
            value = (_DQ_VALUE if text[vstart - 1] == '"' else _SQ_VALUE).match(text, vstart)
            end = value.end() if value else vstart
        else:
            value = _UNQUOTED_VALUE.match(text, vstart)
            end = value.end() if value else vstart
        if end > vstart:
            spans.append((vstart, end))
            pos = max(pos, end)
    return spans


# -- per-program rules ---------------------------------------------------------------------

def _all(word: str) -> list[_Span]:
    return [(0, len(word))] if word else []


def _after_colon(word: str) -> list[_Span]:
    colon = word.find(":")
    return [(colon + 1, len(word))] if 0 <= colon < len(word) - 1 else []


_Handler = Callable[[str], list[_Span]]


@dataclass(frozen=True)
class ProgramRule:
    """How one program takes credentials on its command line.

    `next_word`: options whose next argument is handled (masked whole, after its colon, as
    a header); `attached`: a regex whose group `v` is an option's attached value, handled
    by the handler named in its group name; `mask_after`: words after which every
    remaining word is masked (`redis-cli AUTH user pass`); `command_after_options`: the
    first operand starts a new command (`sshpass -p x ssh -p 22 host`).
    """

    next_word: dict[str, _Handler] = field(default_factory=dict)
    attached: tuple[tuple[re.Pattern[str], _Handler], ...] = ()
    mask_after: frozenset[str] = frozenset()
    command_after_options: bool = False
    options_with_value: frozenset[str] = frozenset()


_MYSQL = ProgramRule(attached=(
    # A cluster of boolean short options ending in p: the rest is the password (-pX, -vpX).
    (re.compile(r"-[ABCEGHILNTUVXcfinqrstvwx]*+p(?P<v>.+)", re.S), _all),
    # Unique prefixes of --password are accepted by mysql: --pass=x, --passwo=x.
    (re.compile(r"--pas(?:s(?:w(?:o(?:r(?:d[123]?)?)?)?)?)?=(?P<v>.+)", re.S), _all),
))
_REDIS = ProgramRule(next_word={"-a": _all, "--pass": _all, "--user": _all},
                     attached=((re.compile(r"-a(?P<v>.+)", re.S), _all),),
                     mask_after=frozenset({"auth"}))
_SSHPASS = ProgramRule(next_word={"-p": _all},
                       attached=((re.compile(r"-[hvVe]*+p(?P<v>.+)", re.S), _all),),
                       command_after_options=True,
                       options_with_value=frozenset({"-f", "-d", "-P", "-p"}))
_CURL = ProgramRule(
    next_word={"-u": _after_colon, "--user": _after_colon, "-U": _after_colon,
               "--proxy-user": _after_colon, "-E": _after_colon, "--cert": _after_colon,
               "--proxy-cert": _after_colon, "--oauth2-bearer": _all},
    attached=((re.compile(r"-u(?P<v>.+)", re.S), _after_colon),
              (re.compile(r"--(?:user|proxy-user)=(?P<v>.+)", re.S), _after_colon)))

PROGRAM_RULES: dict[str, ProgramRule] = {
    **{name: _MYSQL for name in (
        "mysql", "mysqldump", "mysqladmin", "mysqlimport", "mysqlshow", "mysqlcheck",
        "mysqlslap", "mysqlbinlog", "mysqlpump", "mysqlsh", "mysql_upgrade", "mariadb",
        "mariadb-dump", "mariadb-admin", "mariadb-import", "mariadb-show", "mariadb-check",
        "mariadb-slap", "mariadb-binlog", "mariadb-upgrade", "mycli")},
    **{name: _REDIS for name in ("redis-cli", "keydb-cli", "valkey-cli")},
    "sshpass": _SSHPASS,
    "curl": _CURL,
    # wget's credentials all go by credential names (--password, --http-password,
    # --header='Authorization: …'), which the generic rules mask; listed so that it is a
    # known program in `ssh host wget …`.
    "wget": ProgramRule(),
}
# Programs that run another command given in their arguments; a known program named after
# them brings its rules (`sudo -u app mysql -pX`, `ssh host redis-cli -a x`).
_NO_RULES = ProgramRule()


def _program(word: str) -> str:
    return word.rpartition("/")[2].lower()


def _strip_quotes(word: str) -> tuple[str, int]:
    if len(word) >= 2 and word[0] == word[-1] and word[0] in "\"'":
        return word[1:-1], 1
    return word, 0


_FLAG = re.compile(r"--?+(?P<name>[\w.-]++)")

# A shell word: runs of plain characters, escapes and quoted strings, all possessive.
_SHELL_TOKEN = re.compile(
    r"""(?P<sep>[;&|()`\n]++)|(?P<word>(?:[^\s;&|()`'"\\]++|\\.|'[^']*+'?|"(?:[^"\\]++|\\.)*+"?)++)""",
    re.S)
_PROGRAM_WORDS = ("mysql", "mariadb", "mycli", "redis", "keydb", "valkey", "sshpass", "curl",
                  "wget")


@dataclass
class _Rules:
    builtin: bool
    builtin_flags: bool
    flags: tuple[re.Pattern[str], ...]
    work: Budget = field(default_factory=Budget)


def _command_spans(words: Sequence[str], rules: _Rules, depth: int) -> list[list[_Span]]:
    """Masked spans of each word of one command (argv, or a command in a shell string)."""
    spans: list[list[_Span]] = [[] for _ in words]
    if not words:
        return spans
    rule = PROGRAM_RULES.get(_program(words[0]), _NO_RULES) if rules.builtin else _NO_RULES
    pending: _Handler | None = None  # what the previous option says about this word
    after_all = False
    for i, word in enumerate(words):
        if depth == 0 and rules.builtin:
            # Shell words were counted as they were split; arguments are counted here.
            rules.work.left -= 1
            if rules.work.left < 0:
                closed = _closed_spans(words[i:], rules, pending is not None,
                                       rule is not _NO_RULES or after_all)
                for j, extra in enumerate(closed):
                    spans[i + j].extend(extra)
                return spans
        if rules.builtin:
            spans[i].extend(text_spans(word, rules.work))
            if depth < SHELL_DEPTH and (" " in word or "\t" in word or "\n" in word):
                spans[i].extend(_shell_spans(word, rules, depth + 1))
        if i == 0:
            continue
        option = word.startswith("-")
        if pending is _unless_option and option:
            pending = None  # `--password --verbose`: the flag had no value here
        if after_all or pending is not None:
            spans[i].extend((pending or _all)(word))
            pending = None
            continue
        if option and len(word) <= USER_FLAG_SPAN and any(
                flag.fullmatch(word) for flag in rules.flags):
            pending = _unless_option
        if not rules.builtin:
            continue
        if option:
            pending = _option(word, rule, rules, spans[i]) or pending
            continue
        if word.lower() in rule.mask_after:
            after_all = True
        elif rule.command_after_options:
            # `sshpass -p x ssh -p 22 host`: ssh's -p is a port, not sshpass's password.
            for j, extra in enumerate(_command_spans(words[i:], rules, depth)):
                spans[i + j].extend(extra)
            return spans
        elif rule is _NO_RULES:
            rule = PROGRAM_RULES.get(_program(_strip_quotes(word)[0]), _NO_RULES)
    return spans


_SUSPECT = re.compile(r"(?i)" + _CANDIDATE + r"|://")


def _closed_spans(words: Sequence[str], rules: _Rules, mask_first: bool,
                  has_rule: bool) -> list[list[_Span]]:
    """Spans of the arguments left when the work budget is spent, found in one C-speed scan."""
    joined = "\0".join(words)
    if has_rule or any(w in joined.lower() for w in _PROGRAM_WORDS):
        return [_all(word) for word in words]  # `-pSECRET` needs no credential word
    starts = list(itertools.accumulate((len(w) + 1 for w in words), initial=0))
    suspects = {bisect.bisect_right(starts, m.start()) - 1 for m in _SUSPECT.finditer(joined)}
    if rules.flags:
        suspects.update(i for i, w in enumerate(words) if w.startswith("-")
                        and len(w) <= USER_FLAG_SPAN
                        and any(flag.fullmatch(w) for flag in rules.flags))
    # `--password x`: the value is the next argument.
    masked = suspects | {i + 1 for i in suspects} | ({0} if mask_first else set())
    return [_all(w) if i in masked else [] for i, w in enumerate(words)]


def _option(word: str, rule: ProgramRule, rules: _Rules, spans: list[_Span]) -> _Handler | None:
    """Mask what option `word` carries; return what to do with the next word, if anything."""
    handler = rule.next_word.get(word)
    if handler is not None:
        return handler
    for regex, attached in rule.attached:
        m = regex.fullmatch(word)
        if m is not None:
            start = m.start("v")
            spans.extend((start + s, start + e) for s, e in attached(m.group("v")))
            return None
    if word in rule.options_with_value:
        return _keep
    flag = _FLAG.fullmatch(word)
    if rules.builtin_flags and flag is not None and is_secret_name(flag.group("name")):
        return _unless_option
    return None


def _unless_option(word: str) -> list[_Span]:
    return _all(word)


def _keep(word: str) -> list[_Span]:
    return []


def _shell_spans(text: str, rules: _Rules, depth: int) -> list[_Span]:
    """Spans of a shell string (`bash -c "mysql -pX && …"`), each command masked as argv."""
    inner, offset = _strip_quotes(text)
    low = inner.lower()
    if not (_has_candidate(low) or any(word in low for word in _PROGRAM_WORDS)):
        return []  # no credential word and no program with rules: nothing to find
    spans: list[_Span] = []
    command: list[str] = []
    starts: list[int] = []

    def flush() -> None:
        if command:
            words = []
            shifts = []
            for word in command:
                stripped, shift = _strip_quotes(word)
                words.append(stripped)
                shifts.append(shift)
            for start, shift, word_spans in zip(starts, shifts, _command_spans(
                    words, rules, depth), strict=True):
                base = offset + start + shift
                spans.extend((base + s, base + e) for s, e in word_spans)
            command.clear()
            starts.clear()

    for m in _SHELL_TOKEN.finditer(inner):
        if rules.work.left <= 0:
            tail = low[m.start():]
            if _has_candidate(tail) or any(word in tail for word in _PROGRAM_WORDS):
                spans.append((offset + m.start(), offset + len(inner)))
            return spans
        if m.lastgroup == "sep":
            flush()
        else:
            rules.work.left -= 1
            command.append(m.group("word"))
            starts.append(m.start())
    flush()
    return spans


def _may_hold_secret(argv: Sequence[str]) -> bool:
    """False when no built-in rule can match anywhere in argv: one C-speed pass."""
    joined = "\0".join(argv)
    low = joined.lower()
    return ("://" in joined or _has_candidate(low)
            or any(word in low for word in _PROGRAM_WORDS))


def apply_spans(text: str, spans: Iterable[_Span]) -> str:
    """`text` with each span (merged where they touch) replaced by `***`."""
    if isinstance(spans, list) and len(spans) == 1:  # the common case: one span, no sorting
        s, e = spans[0]
        return text[:s] + MASK + text[e:] if e > s else text
    ordered = sorted(s for s in spans if s[1] > s[0])
    if not ordered:
        return text
    out: list[str] = []
    last = 0
    cur_s, cur_e = ordered[0]
    for s, e in ordered[1:]:
        if s <= cur_e:
            cur_e = max(cur_e, e)
            continue
        out += (text[last:cur_s], MASK)
        last = cur_e
        cur_s, cur_e = s, e
    out += (text[last:cur_s], MASK, text[cur_e:])
    return "".join(out)


# -- the masker ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Masker:
    """Masks credential values in an argv. Call it: `masker(argv) -> argv`. Pure; no cache."""

    patterns: tuple[re.Pattern[str], ...] = ()  # user value patterns (group `value`)
    secret_flags: tuple[re.Pattern[str], ...] = ()  # user flags whose next argument is secret
    enabled: bool = True
    builtin: bool = True  # the built-in value and program rules
    builtin_flags: bool = True  # the built-in `--credential-name value` rule

    @classmethod
    def build(cls, patterns: Sequence[str] = (),
              secret_flags: Sequence[str] | None = None, enabled: bool = True, *,
              builtin: bool = True) -> Masker:
        """A masker with the built-in rules (unless `builtin` is false) plus user regexes.

        `secret_flags`, when given, replaces the built-in credential-flag rule.
        """
        return cls(tuple(re.compile(p) for p in patterns),
                   tuple(re.compile(p) for p in secret_flags or ()), enabled, builtin,
                   secret_flags is None)

    def __call__(self, argv: Sequence[str]) -> list[str]:
        if not self.enabled or not argv:
            return list(argv)
        return [apply_spans(arg, spans) if spans else arg
                for arg, spans in zip(argv, self.spans(argv), strict=True)]

    def spans(self, argv: Sequence[str]) -> list[list[_Span]]:
        """For each argument, the spans that are masked (unsorted, may overlap)."""
        if not self.enabled or not argv:
            return [[] for _ in argv]
        rules = _Rules(self.builtin, self.builtin_flags, self.secret_flags)
        if self.builtin and not self.secret_flags and not _may_hold_secret(argv):
            spans: list[list[_Span]] = [[] for _ in argv]
        else:
            spans = _command_spans(argv, rules, 0)
        budget = USER_PATTERN_BUDGET
        for arg, arg_spans in zip(argv, spans, strict=True):
            if budget <= 0 or not self.patterns:
                break
            head = arg[:min(USER_PATTERN_SPAN, budget)]
            budget -= len(head)
            for pattern in self.patterns:
                arg_spans.extend(_user_spans(pattern, head, len(arg)))
        return spans

    def mask_text(self, text: str) -> str:
        """One string that may hold a command line (argv[0] rewritten by its process)."""
        return self([text])[0]


# The built-in rules, for callers not handed the configured masker.
DEFAULT_MASKER = Masker.build()


def _user_spans(pattern: re.Pattern[str], head: str, full: int) -> list[_Span]:
    found = []
    for match in pattern.finditer(head):
        start, end = match.span("value")
        if start < 0 or end <= start:
            continue
        # A value cut by the span limit may go on: mask the rest of the argument too.
        found.append((start, full if end == len(head) else end))
    return found


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be a value pattern (None when it can)."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"invalid regex: {exc}"
    if "value" not in compiled.groupindex:
        return "needs a group named 'value' (the part replaced by ***), e.g. token=(?P<value>\\S+)"
    return backtracking_risk(pattern)


def backtracking_risk(pattern: str) -> str | None:
    """Why `pattern` may take exponential time on hostile text (None when it is not known to).

    Catches the classic causes: a repeated group holding another quantifier, `(a+)+`,
    `(\\w+\\s?)*` or `(x?x)+`; a repeated group holding alternatives that may start alike,
    `(a|aa)+` or `(a|a?b)*`; and backreferences. Polynomial cost that remains (`.*x.*y`) is
    bounded by the length limits applied to the text (masking's user patterns, groups'
    cmdline regexes).
    """
    try:
        # A private module, so typeshed has no stub for it: its names are Any here (and a
        # fresh mypy --strict reports no error to ignore on this line).
        from re import _parser
    except ImportError:  # pragma: no cover - a Python without re._parser; the limits remain
        return None
    try:
        tree = _parser.parse(pattern)
    except re.error as exc:
        return f"invalid regex: {exc}"
    repeats = {_parser.MAX_REPEAT, _parser.MIN_REPEAT}
    repeats |= {getattr(_parser, "POSSESSIVE_REPEAT", _parser.MAX_REPEAT)}
    backrefs = {_parser.GROUPREF, _parser.GROUPREF_EXISTS}

    def walk(items: Iterable[tuple[Any, Any]], inside_repeat: bool) -> str | None:
        for op, arg in items:  # a SubPattern: (opcode, argument) pairs
            if op in backrefs:
                return "backreferences are not allowed (they can take exponential time)"
            if op in repeats:
                low, high, sub = arg
                if inside_repeat and low != high:
                    return ("nested quantifiers such as (a+)+ or (x?x)+ are not allowed (they "
                            "can take exponential time on hostile command lines)")
                why = walk(sub, inside_repeat or high > 1)
            elif op == _parser.SUBPATTERN:
                why = walk(arg[-1], inside_repeat)
            elif op == _parser.BRANCH:
                if inside_repeat and not _distinct_starts(arg[1]):
                    return ("a repeated group of alternatives that may start alike, such as "
                            "(a|aa)+, is not allowed (it can take exponential time on hostile "
                            "command lines); start each alternative with a different character")
                why = next((w for w in (walk(b, inside_repeat) for b in arg[1]) if w), None)
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
                why = walk(arg[1], inside_repeat)
            elif op == getattr(_parser, "ATOMIC_GROUP", None):
                why = walk(arg, inside_repeat)
            else:
                why = None
            if why:
                return why
        return None

    def _distinct_starts(branches: list[Any]) -> bool:
        """Whether each alternative starts with its own literal character (one way to match)."""
        firsts = set()
        for branch in branches:
            items = list(branch)
            if not items or items[0][0] != _parser.LITERAL:
                return False
            firsts.add(chr(items[0][1]).lower())
        return len(firsts) == len(branches)

    return walk(tree, False)


# -- the cache ------------------------------------------------------------------------------

CACHE_MAX_BYTES = 16 * 1024 * 1024
CACHE_MAX_ENTRY = 1024 * 1024  # a longer command line is masked afresh each time
_STR_OVERHEAD = 56  # what CPython spends on a str besides its characters


def _cost(argv: Sequence[str]) -> int:
    return sum(len(a) + _STR_OVERHEAD for a in argv)


class MaskCache:
    """Masked command lines of live processes, keyed by (pid, start ticks).

    Command lines repeat across lookups and listings; masking the same one again is waste.
    Bounded twice: at most `max_bytes` of masked text (least recently used first out), and
    only processes still alive: an entry goes when its pid is seen with another start or
    argv, or when `prune` is told the pids that exist. One entry per pid, so at most one
    per live process.
    """

    def __init__(self, mask: Callable[[Sequence[str]], list[str]], *,
                 max_bytes: int = CACHE_MAX_BYTES, max_entry: int = CACHE_MAX_ENTRY) -> None:
        self.mask = mask
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)
        self.bytes = 0
        # pid -> (start ticks, hash of argv, masked argv, its cost in bytes)
        self._entries: OrderedDict[int, tuple[int, int, list[str], int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pid: object) -> bool:
        return pid in self._entries

    def masked(self, pid: int, start: int, argv: Sequence[str]) -> list[str]:
        """The masked argv of process (pid, start), from the cache when it is unchanged."""
        digest = hash(tuple(argv))
        with self._lock:
            hit = self._entries.get(pid)
            if hit is not None and hit[0] == start and hit[1] == digest:
                self._entries.move_to_end(pid)
                return list(hit[2])
        masked = self.mask(argv)
        cost = _cost(masked)
        with self._lock:
            self._drop(pid)
            if cost <= self.max_entry:
                while self._entries and self.bytes + cost > self.max_bytes:
                    self._drop(next(iter(self._entries)))
                self._entries[pid] = (start, digest, masked, cost)
                self.bytes += cost
        return list(masked)

    def bind(self, pid: int, start: int) -> Callable[[Sequence[str]], list[str]]:
        """`mask(argv)` for one process, the shape `to_info` takes."""
        return lambda argv: self.masked(pid, start, argv)

    def prune(self, alive: Iterable[int]) -> None:
        """Forget the processes whose pid is not in `alive`."""
        keep = set(alive)
        with self._lock:
            for pid in [p for p in self._entries if p not in keep]:
                self._drop(pid)

    def _drop(self, pid: int) -> None:
        entry = self._entries.pop(pid, None)
        if entry is not None:
            self.bytes -= entry[3]


__all__ = ["CACHE_MAX_BYTES", "DEFAULT_MASKER", "MASK", "PROGRAM_RULES", "USER_PATTERN_BUDGET",
           "USER_PATTERN_SPAN", "WORK_BUDGET", "Budget",
           "MaskCache", "Masker", "apply_spans", "backtracking_risk", "check_pattern",
           "is_secret_name", "text_spans"]
