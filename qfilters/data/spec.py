"""Parse corpus spec strings into small typed descriptions, before any download or file reading happens.

Precedence, so that ``handbook:en`` can never be taken for a file name: a known kind prefix (``handbook``,
``austen``, ``bible``, ``jargon``, ``python-docs``, ``python-code``, ``fortunes``, ``hf``) always wins; ``file:PATH``
forces a local path; otherwise the string must be an existing file or directory, or a glob that matches something.
Anything else is a :class:`DatasetSpecError` that lists the valid kinds.

``parse_spec(spec, allow_local=False)`` is the form for services that take specs from other people: local paths in
any syntax are refused without looking at the disk, and ``hf:`` names are marked Hub-only (:attr:`HFSpec.hub_only`):
a name that exists as a local path or names one of ``datasets``' file-format builders (``json``, ``csv``...) is
refused, and the loader fetches it from the Hub only, never from a local directory.

Local JSONL files take their text from the field named after ``#`` (``data/train.jsonl#content``); the default field
is ``text``. The ``#FIELD`` suffix is only split off when the whole string is not itself an existing path.

``hf:`` specs: two fields are NAME:SPLIT; four are NAME:CONFIG:SPLIT:COLUMN (CONFIG may be empty); three are
NAME:SPLIT:COLUMN when the middle one is a usual split name (train/test/validation/...) and the last is not,
otherwise NAME:CONFIG:SPLIT. Split slices such as ``train[:1000]`` may contain colons. The normalized form always
has four fields.
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from qfilters.errors import DatasetSpecError

#: Locales shipped by debian-handbook 11.20220922 (bookworm); used to resolve short codes like ``en`` at parse time.
HANDBOOK_LOCALES: tuple[str, ...] = (
    "ar-MA", "ca-ES", "cs-CZ", "da-DK", "de-DE", "el-GR", "en-US", "es-ES", "fa-IR", "fr-FR", "hr-HR", "id-ID",
    "it-IT", "ja-JP", "ko-KR", "nb-NO", "nl-NL", "pl-PL", "pt-BR", "ro-RO", "ru-RU", "sv-SE", "tr-TR", "vi-VN",
    "zh-CN", "zh-TW",
)  # fmt: skip

#: Fortune languages -> the Debian packages that hold them (English is split over fortunes-min and fortunes).
FORTUNE_PACKAGES: dict[str, tuple[str, ...]] = {
    "en": ("fortunes-min", "fortunes"),
    "de": ("fortunes-de",),
    "es": ("fortunes-es",),
    "it": ("fortunes-it",),
    "ru": ("fortunes-ru",),
}

_KINDS: tuple[tuple[str, str], ...] = (
    ("handbook[:LANG]", "Debian Administrator's Handbook prose, Debian package debian-handbook. LANG: a language "
     "code (en, fr, de, es, ru, ja, ...) or a locale (pt-BR, zh-TW); default en"),
    ("austen", "Jane Austen's six novels, Debian package r-cran-janeaustenr"),
    ("bible", "the World English Bible, one document per book, Debian package sword-text-web"),
    ("jargon", "the Jargon File's hacker lexicon, one document per initial, Debian package jargon-text"),
    ("python-docs", "Python 3.11 documentation reST sources, Debian package python3.11-doc"),
    ("python-code", "this interpreter's standard-library .py files, tests and site-packages excluded"),
    ("fortunes[:LANG]", "fortune cookies, Debian packages fortunes / fortunes-LANG. LANG: "
     + ", ".join(FORTUNE_PACKAGES) + "; default en"),
    ("hf:NAME[:CONFIG]:SPLIT[:COLUMN]", "a Hugging Face dataset split (needs `pip install 'qfilters[hf]'`); "
     "COLUMN defaults to text, e.g. hf:wikitext:wikitext-2-raw-v1:test:text"),
    ("PATH | DIR | GLOB[#FIELD]", "local files: .txt/.md one document per file, .jsonl one per line from string "
     "field FIELD (default text); directories are searched recursively; prefix file: to force a path"),
)  # fmt: skip

_COMMON_SPLITS = {"train", "test", "validation", "valid", "dev", "eval", "evaluation"}
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HF_SPLIT = re.compile(r"^[A-Za-z0-9_.-]+(\[[^\]\x00-\x1f]*\])?(\+[A-Za-z0-9_.-]+(\[[^\]\x00-\x1f]*\])?)*$")
# configs: what datasets itself accepts ("C++", "Visual Basic-all", "20220301.en"), nothing path-like; columns are
# only ever a dictionary key: any printable name
_HF_CONFIG = re.compile(r"[^./\\<>|?*\x00-\x1f][^/\\<>|?*\x00-\x1f]{0,199}")
_HF_COLUMN = re.compile(r"[^\x00-\x1f]{1,200}")
_LOCALE = re.compile(r"^([A-Za-z]{2,3})(?:[-_]([A-Za-z]{2}))?$")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Spec:
    """Base class of all parsed specs; ``str(spec)`` is the normalized spec string."""

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def normalized(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.normalized

    def shares_text_with(self, other: Spec) -> bool:
        """Whether the two specs can read the same documents (evaluation text must be held out from calibration)."""
        return self.normalized == other.normalized


@dataclass(frozen=True)
class LocalSpec(Spec):
    """Local files: ``path`` is a file, directory or glob; ``field`` is the JSONL text field."""

    path: str
    field: str = "text"

    @property
    def kind(self) -> str:
        return "local"

    @property
    def normalized(self) -> str:
        text = self.path if self.field == "text" else f"{self.path}#{self.field}"
        head = text.partition(":")[0].lower()
        return f"file:{text}" if head in _PREFIXES or head == "file" else text


@dataclass(frozen=True)
class HFSpec(Spec):
    """A Hugging Face dataset split; ``config`` is ``None`` for datasets without configurations."""

    name: str
    config: str | None
    split: str
    column: str = "text"
    hub_only: bool = field(default=False, compare=False)  # never resolve ``name`` as a local path (services)

    @property
    def kind(self) -> str:
        return "hf"

    @property
    def normalized(self) -> str:  # always four fields, so it re-parses without the three-field heuristic
        return f"hf:{self.name}:{self.config or ''}:{self.split}:{self.column}"

    def shares_text_with(self, other: Spec) -> bool:
        """One Hub dataset (ids ignore case), one config (none = ``default``) and a split in common, whatever slice
        or column: ``hf:x:train[:10%]`` and ``hf:X:default:train+test:body`` read the same rows."""
        if not isinstance(other, HFSpec):
            return False

        def splits(split: str) -> set[str]:
            return {s.lower() for s in re.sub(r"\[[^\]]*\]", "", split).split("+")}

        return (self.name.lower() == other.name.lower() and (self.config or "default") == (other.config or "default")
                and bool(splits(self.split) & splits(other.split)))


@dataclass(frozen=True)
class HandbookSpec(Spec):
    """The Debian Administrator's Handbook in one locale (always the full form, e.g. ``en-US``)."""

    locale: str

    @property
    def kind(self) -> str:
        return "handbook"

    @property
    def normalized(self) -> str:
        lang = self.locale.split("-")[0]
        unique = [loc for loc in HANDBOOK_LOCALES if loc.split("-")[0] == lang] == [self.locale]
        return f"handbook:{lang if unique else self.locale}"


@dataclass(frozen=True)
class FortunesSpec(Spec):
    """Fortune-cookie files of one language."""

    lang: str

    @property
    def kind(self) -> str:
        return "fortunes"

    @property
    def packages(self) -> tuple[str, ...]:
        return FORTUNE_PACKAGES[self.lang]

    @property
    def normalized(self) -> str:
        return f"fortunes:{self.lang}"


@dataclass(frozen=True)
class NamedSpec(Spec):
    """A fixed corpus without arguments: ``austen``, ``bible``, ``jargon``, ``python-docs`` or ``python-code``."""

    name: str

    @property
    def kind(self) -> str:
        return self.name

    @property
    def normalized(self) -> str:
        return self.name


def available_specs() -> list[tuple[str, str]]:
    """``(pattern, description)`` for every spec kind, for ``qfilters info`` and help texts."""
    return list(_KINDS)


def parse_spec(spec: str, *, allow_local: bool = True) -> Spec:
    """Parse and validate ``spec`` without fetching anything; raise :class:`DatasetSpecError` if it is not valid.

    ``allow_local=False`` (services): local paths are refused whatever their syntax, without touching the disk, and
    ``hf:`` specs come back Hub-only (see :func:`check_hub_dataset_name`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetSpecError(f"empty dataset spec {spec!r}.\n{_kinds_help()}")
    text = spec.strip()
    head, has_arg, arg = text.partition(":")
    key = head.lower()
    if key in _PREFIXES:
        parsed = _PREFIXES[key](text, arg if has_arg else None)
        if isinstance(parsed, HFSpec) and not allow_local:
            check_hub_dataset_name(parsed.name, text)
            parsed = replace(parsed, hub_only=True)
        return parsed
    if not allow_local:
        raise DatasetSpecError(
            f"dataset spec {spec!r} is not available here: local paths are refused; use one of "
            f"{', '.join(p for p in _PREFIXES if p != 'hf')} or hf:NAME:SPLIT (a Hugging Face Hub dataset)."
        )
    if key == "file" and has_arg:
        forced = _parse_local(text, arg, forced=True)
        assert forced is not None  # forced=True raises instead of returning None
        return forced
    local = _parse_local(text, text, forced=False)
    if local is not None:
        return local
    close = difflib.get_close_matches(key, list(_PREFIXES), n=1, cutoff=0.75)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DatasetSpecError(
        f"unknown dataset spec {spec!r}: it is not a known corpus kind and no file, directory or glob match exists "
        f"at that path.{hint}\n{_kinds_help()}"
    )


def _kinds_help() -> str:
    return "Valid specs:\n" + "\n".join(f"  {pattern:<34} {desc}" for pattern, desc in _KINDS)


def _no_argument(name: str):  # type: ignore[no-untyped-def]
    def parse(spec: str, arg: str | None) -> Spec:
        if arg is not None:
            raise DatasetSpecError(f"dataset spec {spec!r}: {name!r} takes no argument; write just {name!r}.")
        return NamedSpec(name)

    return parse


def _parse_handbook(spec: str, arg: str | None) -> HandbookSpec:
    return HandbookSpec(resolve_handbook_locale(arg or "en", spec))


def resolve_handbook_locale(lang: str, spec: str | None = None) -> str:
    """Map ``en`` -> ``en-US``, ``pt_br`` -> ``pt-BR``; ambiguous or unknown codes raise listing the choices."""
    where = f"dataset spec {spec!r}" if spec else f"handbook language {lang!r}"
    match = _LOCALE.fullmatch(lang.strip())
    if not match:
        raise DatasetSpecError(f"{where}: {lang!r} is not a language code or locale. Available locales: "
                               f"{', '.join(HANDBOOK_LOCALES)}.")
    language, region = match.group(1).lower(), match.group(2)
    if region:  # full locale: accepted even if newer than our table; the loader checks it exists in the package
        return f"{language}-{region.upper()}"
    options = [loc for loc in HANDBOOK_LOCALES if loc.split("-")[0] == language]
    if len(options) == 1:
        return options[0]
    if options:
        choices = " or ".join(f"handbook:{loc}" for loc in options)
        raise DatasetSpecError(f"{where}: language {language!r} is ambiguous; use {choices}.")
    raise DatasetSpecError(f"{where}: the Debian handbook has no {language!r} translation. Available: "
                           f"{', '.join(sorted({loc.split('-')[0] for loc in HANDBOOK_LOCALES}))} "
                           f"(or a full locale such as pt-BR).")


def _parse_fortunes(spec: str, arg: str | None) -> FortunesSpec:
    lang = (arg or "en").strip().lower()
    if lang not in FORTUNE_PACKAGES:
        raise DatasetSpecError(f"dataset spec {spec!r}: no Debian fortunes package for language {lang!r}; "
                               f"available: {', '.join(f'fortunes:{code}' for code in FORTUNE_PACKAGES)}.")
    return FortunesSpec(lang)


def _parse_hf(spec: str, arg: str | None) -> HFSpec:
    usage = ("expected hf:NAME[:CONFIG]:SPLIT[:COLUMN], e.g. hf:wikitext:wikitext-2-raw-v1:test:text or "
             "hf:imdb::test:text (empty CONFIG)")
    parts = _split_outside_brackets(arg) if arg else []
    if not 2 <= len(parts) <= 4:
        raise DatasetSpecError(f"dataset spec {spec!r}: {usage}.")
    if len(parts) == 2:
        name, config, split, column = parts[0], None, parts[1], "text"
    elif len(parts) == 4:
        name, config, split, column = parts
    elif _looks_like_split(parts[1]) and not _looks_like_split(parts[2]):
        name, config, split, column = parts[0], None, parts[1], parts[2]  # NAME:SPLIT:COLUMN
    else:
        name, config, split, column = parts[0], parts[1], parts[2], "text"  # NAME:CONFIG:SPLIT
    config = config or None
    if not _HF_NAME.fullmatch(name):
        raise DatasetSpecError(f"dataset spec {spec!r}: {name!r} is not a Hub dataset name (owner/name); {usage}.")
    if not split or not _HF_SPLIT.fullmatch(split):
        raise DatasetSpecError(f"dataset spec {spec!r}: {split!r} is not a split such as train, test or "
                               f"train[:1000]; {usage}.")
    if config is not None and (not _HF_CONFIG.fullmatch(config) or ".." in config):
        raise DatasetSpecError(f"dataset spec {spec!r}: {config!r} is not a dataset config name (no path "
                               f"characters / \\ < > | ? *, no leading '.', no '..'); {usage}.")
    if not column:
        raise DatasetSpecError(f"dataset spec {spec!r}: empty COLUMN; {usage}.")
    if not _HF_COLUMN.fullmatch(column):
        raise DatasetSpecError(f"dataset spec {spec!r}: {column!r} is not a column name (at most 200 printable "
                               f"characters); {usage}.")
    return HFSpec(name, config, split, column)


#: ``datasets``' packaged builders read local (or explicitly listed) files, not a Hub repository of that name.
FILE_BUILDERS = frozenset({
    "arrow", "audiofolder", "cache", "conll", "csv", "eval", "fasta", "fastq", "folder_based_builder", "genbank",
    "generator", "harbor", "hdf5", "iceberg", "imagefolder", "json", "lance", "meshfolder", "mmcif", "niftifolder",
    "pandas", "parquet", "pdb", "pdffolder", "spark", "sql", "text", "tsfile", "videofolder", "vortex", "webdataset",
    "xml",
})  # fmt: skip


def check_hub_dataset_name(name: str, spec: str | None = None) -> None:
    """Refuse an ``hf:`` name that ``datasets`` would not take from the Hub: a file-format builder, or a name that
    exists as a path relative to the current directory (``datasets.load_dataset`` reads those from the disk)."""
    where = f"dataset spec {spec!r}" if spec else f"Hub dataset {name!r}"
    if name.lower() in FILE_BUILDERS:
        raise DatasetSpecError(f"{where}: {name!r} is a datasets file-format builder, not a Hub dataset; name a Hub "
                               "dataset (owner/name) instead.")
    if os.path.lexists(name):
        raise DatasetSpecError(f"{where}: {name!r} is not taken as a Hub dataset here (it names a local path); "
                               "use the full owner/name of the Hub dataset.")


def _looks_like_split(part: str) -> bool:
    return part.split("[")[0].lower() in _COMMON_SPLITS


def _split_outside_brackets(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == ":" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _parse_local(spec: str, text: str, forced: bool) -> LocalSpec | None:
    path, field = text, "text"
    if not _exists(text) and "#" in text:
        path, _, field = text.rpartition("#")
        if not field or not path:
            raise DatasetSpecError(f"dataset spec {spec!r}: write PATH#FIELD with a non-empty JSONL field name.")
    if _exists(path):
        return LocalSpec(path, field)
    if forced:
        raise DatasetSpecError(f"dataset spec {spec!r}: no file, directory or glob match at {path!r}. Check the "
                               "path (relative paths are taken from the current directory).")
    return None


def _exists(path: str) -> bool:
    expanded = os.path.expanduser(path)
    if Path(expanded).exists():
        return True
    return bool(_GLOB_CHARS.search(expanded)) and any(True for _ in glob.iglob(expanded, recursive=True))


_PREFIXES = {
    "handbook": _parse_handbook,
    "austen": _no_argument("austen"),
    "bible": _no_argument("bible"),
    "jargon": _no_argument("jargon"),
    "python-docs": _no_argument("python-docs"),
    "python-code": _no_argument("python-code"),
    "fortunes": _parse_fortunes,
    "hf": _parse_hf,
}
