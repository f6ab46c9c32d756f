"""``load_corpus``: parse the spec first (cheap, fails fast), then dispatch to the loader for its kind."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from qfilters.data import austen, bible, fortunes, handbook, jargon, pysources
from qfilters.data.cache import corpora_dir, load_parsed, safe_name, save_parsed
from qfilters.data.corpus import Corpus, Document
from qfilters.data.debian import DebianPackage, fetch_package
from qfilters.data.spec import FortunesSpec, HandbookSpec, HFSpec, LocalSpec, Spec, parse_spec
from qfilters.errors import DatasetUnavailableError

CacheDir = str | os.PathLike[str] | None
_Loaded = tuple[list[Document], str, dict[str, object]]


def load_corpus(spec: str | Spec, cache_dir: CacheDir = None) -> Corpus:
    """Load the corpus named by ``spec`` (see :func:`qfilters.data.available_specs`).

    ``cache_dir`` is the qfilters cache root (default ``$QFILTERS_CACHE`` or ``~/.cache/qfilters``); corpora live in
    its ``corpora/`` subdirectory. Raises :class:`DatasetSpecError` for an invalid spec (before any download) and
    :class:`DatasetUnavailableError` when the content cannot be fetched here or the corpus is empty.
    """
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    documents, source, metadata = _LOADERS[parsed.kind](parsed, cache_dir)
    if not documents:
        raise DatasetUnavailableError(
            f"dataset spec {parsed.normalized!r} gave an empty corpus ({source}): no non-blank text was found. "
            "Point it at files or a dataset with text content."
        )
    return Corpus(parsed.normalized, documents, source, metadata)


def _load_local(spec: Spec, cache_dir: CacheDir) -> _Loaded:
    from qfilters.data.local import load_local

    assert isinstance(spec, LocalSpec)
    documents, source = load_local(spec)
    return documents, source, {}


def _load_hf(spec: Spec, cache_dir: CacheDir) -> _Loaded:
    from qfilters.data.hf import load_hf

    assert isinstance(spec, HFSpec)
    documents, source = load_hf(spec)
    return documents, source, {}


def _load_python_code(spec: Spec, cache_dir: CacheDir) -> _Loaded:
    import platform

    documents = pysources.parse_python_code()
    return documents, pysources.stdlib_description(), {"python": platform.python_version()}


def _from_packages(
    spec: Spec,
    cache_dir: CacheDir,
    names: Sequence[str],
    parser_version: int,
    parse: Callable[[list[DebianPackage]], list[Document]],
) -> tuple[list[Document], list[DebianPackage]]:
    """Fetch Debian packages, then parse them or reuse the parse cached for exactly these versions."""
    packages = [fetch_package(name, cache_dir) for name in names]
    key = "|".join([spec.normalized, f"parser-v{parser_version}", *(p.label for p in packages)])
    path = corpora_dir(cache_dir) / "parsed" / f"{safe_name(spec.normalized)}.json"
    documents = load_parsed(path, key)
    if documents is None:
        documents = parse(packages)
        if documents:
            save_parsed(path, key, documents)
    return documents, packages


def _versions(packages: list[DebianPackage]) -> dict[str, object]:
    return {"packages": {p.name: p.version for p in packages}}


def _load_handbook(spec: Spec, cache_dir: CacheDir) -> _Loaded:
    assert isinstance(spec, HandbookSpec)
    documents, packages = _from_packages(
        spec, cache_dir, [handbook.PACKAGE], handbook.PARSER_VERSION,
        lambda pkgs: handbook.parse_handbook(pkgs[0].root, spec.locale),
    )  # fmt: skip
    return documents, f"{packages[0].label} ({spec.locale})", _versions(packages)


def _single_package(package: str, parser_version: int, parse: Callable[[Path], list[Document]], what: str
                    ) -> Callable[[Spec, CacheDir], _Loaded]:
    """Loader of a corpus that is one Debian package parsed from its root (no spec argument)."""

    def load(spec: Spec, cache_dir: CacheDir) -> _Loaded:
        documents, packages = _from_packages(spec, cache_dir, [package], parser_version,
                                             lambda pkgs: parse(pkgs[0].root))
        return documents, f"{packages[0].label} ({what})", _versions(packages)

    return load


def _load_fortunes(spec: Spec, cache_dir: CacheDir) -> _Loaded:
    assert isinstance(spec, FortunesSpec)
    documents, packages = _from_packages(
        spec, cache_dir, spec.packages, fortunes.PARSER_VERSION, lambda pkgs: fortunes.parse_fortunes(pkgs, spec.lang)
    )
    return documents, f"{' + '.join(p.label for p in packages)} ({spec.lang})", _versions(packages)


_LOADERS: dict[str, Callable[[Spec, CacheDir], _Loaded]] = {
    "local": _load_local,
    "hf": _load_hf,
    "handbook": _load_handbook,
    "austen": _single_package(austen.PACKAGE, austen.PARSER_VERSION, austen.parse_austen, "janeaustenr: six novels"),
    "bible": _single_package(bible.PACKAGE, bible.PARSER_VERSION, bible.parse_bible, "World English Bible"),
    "jargon": _single_package(jargon.PACKAGE, jargon.PARSER_VERSION, jargon.parse_jargon, "the Jargon File's glossary"),
    "python-docs": _single_package(pysources.DOCS_PACKAGE, pysources.PARSER_VERSION, pysources.parse_python_docs,
                                   "reST sources"),
    "python-code": _load_python_code,
    "fortunes": _load_fortunes,
}
