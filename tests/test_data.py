"""Tests for qfilters.data: spec parsing, local/HF/Debian-packaged corpora, the R reader and token chunking.

Tests marked by ``needs_apt`` fetch real Debian packages into the normal qfilters cache (``$QFILTERS_CACHE`` or
``~/.cache/qfilters``), so only the first run downloads anything.
"""

from __future__ import annotations

import bz2
import gzip
import html
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from qfilters.data import (
    Corpus,
    Document,
    FortunesSpec,
    HandbookSpec,
    HFSpec,
    LocalSpec,
    NamedSpec,
    available_specs,
    debian,
    iter_token_chunks,
    load_corpus,
    loader,
    parse_spec,
)
from qfilters.data.bible import parse_bible, read_ztext
from qfilters.data.cache import load_parsed, save_parsed
from qfilters.data.fortunes import split_fortunes
from qfilters.data.handbook import HTML_ROOT, extract_page
from qfilters.data.jargon import split_glossary
from qfilters.data.rdata import LazyLoadDB, RDataError, RSymbol, RVector, decompress_record, unserialize
from qfilters.data.tokens import PIECE_CHARS
from qfilters.errors import DatasetSpecError, DatasetUnavailableError

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get (Debian/Ubuntu)")


# --------------------------------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    ("text", "expected", "normalized"),
    [
        ("handbook:en", HandbookSpec("en-US"), "handbook:en"),
        ("handbook:EN_us", HandbookSpec("en-US"), "handbook:en"),
        ("handbook", HandbookSpec("en-US"), "handbook:en"),
        ("handbook:fr", HandbookSpec("fr-FR"), "handbook:fr"),
        ("handbook:pt", HandbookSpec("pt-BR"), "handbook:pt"),
        ("handbook:zh-tw", HandbookSpec("zh-TW"), "handbook:zh-TW"),
        ("austen", NamedSpec("austen"), "austen"),
        ("jargon", NamedSpec("jargon"), "jargon"),
        ("bible", NamedSpec("bible"), "bible"),
        ("python-docs", NamedSpec("python-docs"), "python-docs"),
        ("python-code", NamedSpec("python-code"), "python-code"),
        ("fortunes", FortunesSpec("en"), "fortunes:en"),
        ("fortunes:DE", FortunesSpec("de"), "fortunes:de"),
        ("hf:wikitext:wikitext-2-raw-v1:test:text", HFSpec("wikitext", "wikitext-2-raw-v1", "test", "text"),
         "hf:wikitext:wikitext-2-raw-v1:test:text"),
        ("hf:imdb:test", HFSpec("imdb", None, "test", "text"), "hf:imdb::test:text"),
        ("hf:wikitext:wikitext-2-raw-v1:test", HFSpec("wikitext", "wikitext-2-raw-v1", "test", "text"),
         "hf:wikitext:wikitext-2-raw-v1:test:text"),
        ("hf:imdb:train:review", HFSpec("imdb", None, "train", "review"), "hf:imdb::train:review"),
        ("hf:org/data::train[:10%]:body", HFSpec("org/data", None, "train[:10%]", "body"),
         "hf:org/data::train[:10%]:body"),
    ],
)  # fmt: skip
def test_parse_good_specs_and_normalize(text: str, expected: object, normalized: str) -> None:
    spec = parse_spec(text)
    assert spec == expected
    assert spec.normalized == str(spec) == normalized
    assert parse_spec(normalized) == expected  # normalized specs re-parse to the same thing


@pytest.mark.parametrize(
    ("text", "must_mention"),
    [
        ("", ["handbook[:LANG]", "hf:NAME"]),
        ("no-such-kind:foo", ["'no-such-kind:foo'", "handbook[:LANG]", "austen", "python-docs", "python-code",
                              "fortunes[:LANG]", "hf:NAME[:CONFIG]:SPLIT[:COLUMN]", "#FIELD"]),
        ("handbok:en", ["Did you mean 'handbook'"]),
        ("handbook:zh", ["ambiguous", "handbook:zh-CN", "handbook:zh-TW"]),
        ("handbook:xx", ["no 'xx' translation", "en", "fr"]),
        ("handbook:not a lang", ["not a language code"]),
        ("fortunes:fr", ["'fortunes:fr'", "fortunes:en", "fortunes:de"]),
        ("austen:extra", ["takes no argument"]),
        ("jargon:en", ["takes no argument"]),
        ("hf:", ["hf:NAME[:CONFIG]:SPLIT[:COLUMN]"]),
        ("hf:onlyname", ["hf:NAME[:CONFIG]:SPLIT[:COLUMN]"]),
        ("hf:a:b:c:d:e", ["hf:NAME[:CONFIG]:SPLIT[:COLUMN]"]),
        ("hf:bad name:test", ["not a Hub dataset name"]),
        ("hf:name:cfg:bad split!", ["not a split"]),
        ("hf:org/name:/etc/passwd:train:text", ["'/etc/passwd' is not a dataset config name"]),
        ("hf:org/name::train:a\x01b", ["is not a column name"]),
        ("hf:org/name:.hidden:train", ["is not a dataset config name"]),
        ("hf:org/x:train[:10\n]", ["is not a split"]),
        ("hf:org/name:cfg\n:train:text", ["is not a dataset config name"]),
        ("hf:org/name\n:train", ["not a Hub dataset name"]),
        ("file:/definitely/not/here.txt", ["no file, directory or glob match"]),
    ],
)  # fmt: skip
def test_parse_bad_specs_explain_what_to_do(text: str, must_mention: list[str]) -> None:
    with pytest.raises(DatasetSpecError) as info:
        parse_spec(text)
    for needle in must_mention:
        assert needle in str(info.value)
    assert isinstance(info.value, ValueError)  # callers may catch ValueError


def test_known_kinds_win_over_files_with_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("handbook:en").write_text("a file that looks like a spec", encoding="utf-8")
    assert parse_spec("handbook:en") == HandbookSpec("en-US")
    forced = parse_spec("file:handbook:en")
    assert forced == LocalSpec("handbook:en")
    assert forced.normalized == "file:handbook:en"  # keeps the prefix so it re-parses as a path
    assert parse_spec(forced.normalized) == forced
    assert parse_spec("./handbook:en") == LocalSpec("./handbook:en")
    assert load_corpus("file:handbook:en").documents == [Document("handbook:en", "a file that looks like a spec")]


def test_available_specs_cover_every_kind() -> None:
    patterns = [pattern for pattern, description in available_specs()]
    assert all(isinstance(description, str) and description for _, description in available_specs())
    for kind in ("handbook", "austen", "bible", "jargon", "python-docs", "python-code", "fortunes", "hf:", "GLOB"):
        assert any(kind in pattern for pattern in patterns), kind


def test_load_corpus_validates_spec_before_fetching(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("fetched a package for an invalid spec")

    monkeypatch.setattr(loader, "fetch_package", must_not_run)
    with pytest.raises(DatasetSpecError):
        load_corpus("handbook:xx")
    with pytest.raises(DatasetSpecError):
        load_corpus("fortunes:fr")


# --------------------------------------------------------------------------------------------------- local files


@pytest.fixture
def local_tree(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Bee text.\n", encoding="utf-8")
    (root / "a.md").write_text("# Heading\n\nAy markdown.", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("Nested text.", encoding="utf-8")
    (root / "blank.txt").write_text("   \n", encoding="utf-8")
    (root / "ignored.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    records = [{"text": "first record", "id": 1}, {"text": "second record", "id": 2}]
    (root / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return root


def test_directory_is_recursive_sorted_and_typed(local_tree: Path) -> None:
    corpus = load_corpus(str(local_tree))
    assert [d.title for d in corpus.documents] == ["a.md", "b.txt", "d.jsonl:1", "d.jsonl:2", "sub/c.txt"]
    assert corpus.documents[0].text == "# Heading\n\nAy markdown."
    assert corpus.documents[2].text == "first record"
    assert corpus.spec == str(local_tree)
    assert len(corpus) == 5 and corpus.num_chars == sum(len(d.text) for d in corpus.documents)


def test_single_file_and_glob(local_tree: Path) -> None:
    assert load_corpus(str(local_tree / "b.txt")).documents == [Document("b.txt", "Bee text.\n")]
    globbed = load_corpus(str(local_tree / "**" / "*.txt"))
    assert [Path(d.title).name for d in globbed.documents] == ["b.txt", "c.txt"]  # blank.txt is skipped


def test_jsonl_field_selection(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "one", "text": "x"}\n{"body": "two", "text": "y"}\n', encoding="utf-8")
    corpus = load_corpus(f"{path}#body")
    assert [d.text for d in corpus.documents] == ["one", "two"]
    assert corpus.spec == f"{path}#body"
    assert [d.text for d in load_corpus(str(path)).documents] == ["x", "y"]


def test_bad_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DatasetUnavailableError, match=r"broken\.jsonl, line 2: invalid JSON"):
        load_corpus(str(path))
    path.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DatasetSpecError, match=r"broken\.jsonl, line 3: no field 'text' \(fields: body\).*#body"):
        load_corpus(str(path))
    path.write_text('{"text": 42}\n', encoding="utf-8")
    with pytest.raises(DatasetUnavailableError, match=r"line 1: field 'text' is a JSON int"):
        load_corpus(str(path))


def test_field_suffix_on_plain_text_is_rejected(local_tree: Path) -> None:
    with pytest.raises(DatasetSpecError, match=r"no \.jsonl file"):
        load_corpus(f"{local_tree / 'b.txt'}#body")


def test_binary_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "blob.txt"
    path.write_bytes(b"ok \xff\xfe not utf-8")
    with pytest.raises(DatasetUnavailableError, match=r"blob\.txt: not UTF-8"):
        load_corpus(str(path))


def test_empty_corpus_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    (tmp_path / "notes.csv").write_text("not collected from directories", encoding="utf-8")
    with pytest.raises(DatasetUnavailableError, match="empty corpus"):
        load_corpus(str(tmp_path))


# --------------------------------------------------------------------------------------------------- corpus hash


def test_sha256_is_deterministic_and_sensitive(local_tree: Path) -> None:
    first, second = load_corpus(str(local_tree)), load_corpus(str(local_tree))
    assert first.sha256 == second.sha256 and len(first.sha256) == 64
    docs = [Document("a", "hello"), Document("b", "world")]
    base = Corpus("x", docs, "test").sha256
    assert Corpus("other-spec", list(docs), "other source").sha256 == base  # only contents count
    assert Corpus("x", [Document("a", "hello"), Document("b", "world!")], "t").sha256 != base
    assert Corpus("x", [Document("a", "hell"), Document("b", "oworld")], "t").sha256 != base
    assert Corpus("x", [Document("ah", "ello"), Document("b", "world")], "t").sha256 != base
    assert Corpus("x", docs[::-1], "t").sha256 != base
    (local_tree / "b.txt").write_text("Bee text changed.\n", encoding="utf-8")
    assert load_corpus(str(local_tree)).sha256 != first.sha256


def test_document_is_immutable() -> None:
    with pytest.raises(AttributeError):
        Document("t", "x").text = "y"  # type: ignore[misc]


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qfilters import paths
    from qfilters.data import cache

    monkeypatch.setattr(paths, "CACHE_DIR_OVERRIDE", None)
    monkeypatch.delenv("QFILTERS_CACHE", raising=False)
    assert cache.corpora_dir() == Path.home() / ".cache" / "qfilters" / "corpora"
    monkeypatch.setenv("QFILTERS_CACHE", str(tmp_path / "env"))
    assert cache.corpora_dir() == tmp_path / "env" / "corpora"
    monkeypatch.setattr(paths, "CACHE_DIR_OVERRIDE", tmp_path / "module")
    assert cache.corpora_dir() == tmp_path / "module" / "corpora"
    assert cache.corpora_dir(tmp_path / "arg") == tmp_path / "arg" / "corpora"


def test_parsed_cache_roundtrip_and_staleness(tmp_path: Path) -> None:
    path = tmp_path / "parsed" / "x.json"
    docs = [Document("t1", "héllo\n\nworld"), Document("t2", "second")]
    save_parsed(path, "key-v1", docs)
    assert load_parsed(path, "key-v1") == docs
    assert load_parsed(path, "key-v2") is None  # another package/parser version: re-parse
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp files left behind
    path.write_text("{truncated", encoding="utf-8")
    assert load_parsed(path, "key-v1") is None


# --------------------------------------------------------------------------------------------------- R reader


def _int(value: int) -> bytes:
    return struct.pack(">i", value)


def _flags(sexptype: int, attr: bool = False, tag: bool = False, levels: int = 0) -> bytes:
    return _int(sexptype | (attr << 9) | (tag << 10) | (levels << 12))


def _charsxp(text: str | None) -> bytes:
    if text is None:
        return _flags(9) + _int(-1)
    data = text.encode("utf-8")
    return _flags(9, levels=64 if text.isascii() else 8) + _int(len(data)) + data


def _strsxp(values: list[str | None], attr: bool = False) -> bytes:
    return _flags(16, attr=attr) + _int(len(values)) + b"".join(_charsxp(v) for v in values)


def _symbol(name: str) -> bytes:
    return _flags(1) + _charsxp(name)


_NIL = _int(254)
_HEADER_V3 = b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8"


def _named_list(items: list[bytes], names: list[str], names_symbol: bytes) -> bytes:
    return (_flags(19, attr=True) + _int(len(items)) + b"".join(items)
            + _flags(2, tag=True) + names_symbol + _strsxp(names) + _NIL)  # fmt: skip


def test_unserialize_hand_built_xdr() -> None:
    doubles = (_flags(14, attr=True) + _int(2) + struct.pack(">dd", 1.5, -2.0)
               + _flags(2, tag=True) + _symbol("names") + _strsxp(["x", "y"]) + _NIL)  # fmt: skip
    payload = _named_list(
        [_strsxp(["a", None, "é"]), _flags(13) + _int(2) + _int(7) + _int(-(2**31)),
         _flags(10) + _int(2) + _int(1) + _int(0), doubles],
        ["chars", "ints", "lgl", "dbl"],
        _int((1 << 8) | 255),  # REFSXP 1: the "names" symbol already read inside `doubles`
    )  # fmt: skip
    value = unserialize(_HEADER_V3 + payload)
    assert isinstance(value, RVector) and value.rtype == "list"
    assert value.names == ["chars", "ints", "lgl", "dbl"]
    parts = value.as_dict()
    assert parts["chars"] == ["a", None, "é"] and parts["chars"].rtype == "character"
    assert parts["ints"] == [7, None]
    assert parts["lgl"] == [True, False]
    assert parts["dbl"] == [1.5, -2.0] and parts["dbl"].names == ["x", "y"]

    v2 = b"X\n" + _int(2) + _int(0x030602) + _int(0x020300) + _strsxp(["only"])
    assert unserialize(v2) == ["only"]
    with pytest.raises(RDataError, match="truncated"):
        unserialize(_HEADER_V3 + payload[:-6])
    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n3\n")
    assert RSymbol("names") == RSymbol("names")


def test_lazyload_database_and_record_compression(tmp_path: Path) -> None:
    novel = _HEADER_V3 + _strsxp(["CHAPTER 1", "", "It was a dark night."])
    record = struct.pack(">I", len(novel)) + zlib.compress(novel)
    (tmp_path / "Rdata.rdb").write_bytes(b"junk" + record)
    key = _flags(13) + _int(2) + _int(4) + _int(len(record))
    variables = _named_list([key], ["story"], _symbol("names"))
    index = _named_list([variables, _flags(19) + _int(0), _flags(10) + _int(1) + _int(1)],
                        ["variables", "references", "compressed"], _int((1 << 8) | 255))  # fmt: skip
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_HEADER_V3 + index))
    database = LazyLoadDB(tmp_path / "Rdata")
    assert database.names == ["story"] and database.compression == 1
    assert database["story"] == ["CHAPTER 1", "", "It was a dark night."]

    size = struct.pack(">I", len(novel))
    assert decompress_record(size + b"0" + novel, 3) == novel
    assert decompress_record(size + b"1" + zlib.compress(novel), 2) == novel
    assert decompress_record(size + b"2" + bz2.compress(novel), 2) == novel
    assert decompress_record(size + b"Z" + lzma.compress(novel), 3) == novel
    raw_lzma2 = lzma.compress(novel, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    assert decompress_record(size + b"Z" + raw_lzma2, 3) == novel
    with pytest.raises(RDataError, match="unknown compression type"):
        decompress_record(size + b"Q" + novel, 3)
    with pytest.raises(RDataError, match="header says"):
        decompress_record(struct.pack(">I", 1) + zlib.compress(novel), 1)


@needs_apt
def test_austen_from_real_janeaustenr_package() -> None:
    corpus = load_corpus("austen")
    assert corpus.spec == "austen"
    assert [d.title for d in corpus.documents] == [
        "Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride & Prejudice", "Sense & Sensibility",
    ]  # fmt: skip
    pride = corpus.documents[4]
    assert pride.text.startswith("PRIDE AND PREJUDICE")
    assert len(pride.text) > 100_000
    assert "It is a truth universally acknowledged, that a single man in possession\nof a good fortune" in pride.text
    assert "\n\n" in pride.text  # paragraph breaks survive
    assert all(len(d.text) > 100_000 for d in corpus.documents)
    assert re.search(r"r-cran-janeaustenr \S+", corpus.source)
    package = debian.fetch_package("r-cran-janeaustenr")
    database = LazyLoadDB(package.root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    assert sorted(database.names) == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                      "sensesensibility"]  # fmt: skip
    assert database["emma"][0] == "EMMA"


# --------------------------------------------------------------------------------------------------- handbook


def test_prose_extraction_skips_code_navigation_and_titles() -> None:
    page = """<?xml version="1.0" encoding="UTF-8"?><html><head><title>6.2. Tests &amp; Pages</title></head>
    <body><div id="banner"><p>Download the ebook</p></div><ul class="docnav top"><li>Prev</li></ul>
    <div class="section"><div class="titlepage"><h2 class="title">6.2. Heading</h2></div><a id="x" class="indexterm"/>
    <div class="para">First <code class="command">apt</code>
        paragraph.</div>
    <div class="para">Run this:<pre class="screen"><code class="computeroutput">$ </code>
        <strong>apt-get install foo</strong></pre>
        and relax.</div>
    <div class="sidebar"><p class="title"><strong>BACK TO BASICS</strong> Tips</p>
        <div class="para">Sidebar prose.</div></div>
    <div class="example"><p class="title">Example 6.1</p><pre class="programlisting">deb http://example</pre></div>
    <div class="para">Outer <ul><li><div class="para">inner item</div></li></ul> after list.</div>
    <p>Line<br/>break.</p></div><ul class="docnav"><li>Next</li></ul></body></html>"""
    title, paragraphs = extract_page(page)
    assert title == "6.2. Tests & Pages"
    assert paragraphs == ["First apt paragraph.", "Run this: and relax.", "Sidebar prose.", "Outer",
                          "inner item", "after list.", "Line break."]  # fmt: skip


@needs_apt
def test_handbook_en_is_prose_only() -> None:
    corpus = load_corpus("handbook:en")
    assert corpus.spec == "handbook:en" and re.fullmatch(r"debian-handbook \S+ \(en-US\)", corpus.source)
    assert len(corpus) > 100 and corpus.num_chars > 500_000
    text = "\n".join(d.text for d in corpus.documents)
    assert "APT is a vast project, whose original plans included a graphical interface." in text
    assert "Acquire::PDiffs" in text  # inline code inside prose stays
    assert 'sudo apt -o "Acquire::PDiffs=false" update' not in text  # ... but this one is only in a <pre>
    assert "979-10-91414-21-0" not in text  # ISBN from the legal notice on index.html
    paragraphs = [p for d in corpus.documents for p in d.text.split("\n\n")]
    assert not [p for p in paragraphs if re.match(r"^[$#] \S", p)]  # no shell prompts
    # No line of any code/terminal listing in the package shows up in the prose.
    pages = debian.fetch_package("debian-handbook").root / HTML_ROOT / "en-US"
    listing_lines = {
        html.unescape(re.sub(r"<[^>]+>", "", line)).strip()
        for page in pages.glob("*.html")
        for block in re.findall(r"<pre[^>]*>(.*?)</pre>", page.read_text(encoding="utf-8"), re.S)
        for line in block.splitlines()
    }
    long_lines = [line for line in listing_lines if len(line) > 30]
    assert len(long_lines) > 500
    assert [line for line in long_lines if line in text] == []


@needs_apt
def test_handbook_fr_differs_from_en_and_parse_cache_is_faithful() -> None:
    english, french = load_corpus("handbook:en"), load_corpus("handbook:fr-FR")
    assert french.spec == "handbook:fr" and "(fr-FR)" in french.source
    assert french.sha256 != english.sha256
    assert len(french) == len(english)
    assert " les " in french.documents[10].text and " les " not in english.documents[10].text
    from qfilters.data.handbook import parse_handbook

    fresh = parse_handbook(debian.fetch_package("debian-handbook").root, "fr-FR")
    assert fresh == french.documents  # the JSON parse cache returns exactly what parsing gives
    with pytest.raises(DatasetSpecError, match=r"no 'xx-YY' translation \(available: ar-MA, .*en-US"):
        load_corpus("handbook:xx-YY")  # a well-formed locale the package does not ship


# --------------------------------------------------------------------------------------------------- python corpora


def test_python_code_excludes_tests_and_site_packages() -> None:
    corpus = load_corpus("python-code")
    titles = [d.title for d in corpus.documents]
    assert titles == sorted(titles)
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(titles)
    excluded_dirs = {"test", "tests", "idle_test", "site-packages"}
    assert not [t for t in titles if excluded_dirs & set(t.split("/")[:-1])]
    assert not [t for t in titles if t.rsplit("/", 1)[-1].startswith("test_")]
    assert sys.version.split()[0] in corpus.source
    assert all(t.endswith(".py") for t in titles)


@needs_apt
def test_python_docs_from_debian_package() -> None:
    corpus = load_corpus("python-docs")
    titles = [d.title for d in corpus.documents]
    assert titles == sorted(titles) and len(titles) > 400
    assert "library/os.rst" in titles
    assert corpus.source.startswith("python3.11-doc ")
    os_doc = corpus.documents[titles.index("library/os.rst")]
    assert ":mod:`os` --- Miscellaneous operating system interfaces" in os_doc.text


# --------------------------------------------------------------------------------------------------- fortunes


def test_split_fortunes() -> None:
    text = "First one.\n  -- Someone\n%\n\n%\nSecond\nline two\n%\n%   \nThird.\n"
    assert split_fortunes(text) == ["First one.\n  -- Someone", "Second\nline two", "Third."]


@needs_apt
def test_fortunes_en_spans_both_packages_without_index_files() -> None:
    corpus = load_corpus("fortunes:en")
    titles = [d.title for d in corpus.documents]
    assert titles == sorted(titles)
    assert {"fortunes", "literature", "computers", "science"} <= set(titles)  # fortunes-min + fortunes
    assert not [t for t in titles if t.endswith((".dat", ".u8"))]
    assert re.fullmatch(r"fortunes-min \S+ \+ fortunes \S+ \(en\)", corpus.source)
    computers = corpus.documents[titles.index("computers")].text
    assert "\n%\n" not in computers and not computers.startswith("%")
    assert computers.count("\n\n") > 500  # fortunes are separated by blank lines


@needs_apt
def test_fortunes_es_skips_offensive_collection() -> None:
    corpus = load_corpus("fortunes:es")
    titles = {d.title for d in corpus.documents}
    assert "refranes.fortunes" in titles
    assert not titles & {"misogino.fortunes", "camioneros.fortunes", "racistas.fortunes"}  # live in off/


# --------------------------------------------------------------------------------------------------- jargon

_GLOSSARY = """Chapter 1. Hacker Slang

Glossary

  0

   0

   /dev/null

   :/dev/null: /dev·nuhl/, n.

   A notional \u2018black hole\u2019; see {bit bucket}.

  A

   A

   abbrev

   :abbrev: /*-breev'/, /*-brev'/, n.

   Common abbreviation for {abbreviation}.

   :ACK: /ak/, interj.

   1. [common; from the ASCII mnemonic] Acknowledge.

  B

   B

   back door

   :back door: n.

   A hole in the security of a system deliberately left in place; see {trap door}.
   :-bait: suff.

   A suffix filed under B, as the File files it.

   \u00a0 \u00a0 Part\u00a0III.\u00a0Appendices

   Appendix A.
   :Folklore: never an entry
"""


def test_the_jargon_glossary_groups_entries_by_section_and_drops_the_tables_of_contents() -> None:
    documents = split_glossary(_GLOSSARY)
    assert [d.title for d in documents] == ["0-9", "A", "B"]  # symbols and digits first
    symbols, a, b = (d.text for d in documents)
    assert a == (":abbrev: /*-breev'/, /*-brev'/, n.\n\nCommon abbreviation for {abbreviation}.\n\n"
                 ":ACK: /ak/, interj.\n\n1. [common; from the ASCII mnemonic] Acknowledge.\n")
    assert "back door\n\n:back" not in b and b.startswith(":back door: n.")  # B's table of contents is gone
    assert b.endswith(":-bait: suff.\n\nA suffix filed under B, as the File files it.\n")  # its section, not 0-9
    assert symbols == ":/dev/null: /dev·nuhl/, n.\n\nA notional \u2018black hole\u2019; see {bit bucket}.\n"
    everything = "".join(d.text for d in documents)
    assert "Chapter" not in everything and "Part" not in everything and "Folklore" not in everything


@needs_apt
def test_jargon_from_the_real_jargon_text_package() -> None:
    corpus = load_corpus("jargon")
    titles = [d.title for d in corpus.documents]
    assert titles[0] == "0-9" and titles[1:] == [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    assert re.fullmatch(r"jargon-text \S+ \(the Jargon File's glossary\)", corpus.source)
    hack = corpus.documents[titles.index("H")].text
    assert "\n:hack:\n" in hack and "\n:hacker: n.\n" in hack
    assert sum(d.text.count("\n:") for d in corpus.documents) + len(titles) > 2000  # about 2300 entries
    assert all(len(d.text) > 3000 for d in corpus.documents)
    assert "Appendix" not in corpus.documents[-1].text[-2000:]  # the appendices are not glossary


# --------------------------------------------------------------------------------------------------- bible

_OSIS_OT = (
    '<div sID="g1" type="front"/><title>Preface</title>Not scripture.'
    '<div canonical="true" osisID="Gen" sID="g2" type="book"/><title type="main">Genesis</title>'
    '<div sID="g3" type="x-p"/><chapter osisID="Gen.1" sID="Gen.1"/><w lemma="strong:H0430">In</w> the beginning, '
    '<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>Elohim.</note>'
    '<w lemma="strong:H1254">created</w> the heavens. God\u2019s<note>x</note>Spirit moved and<note>y</note>'
    'Samellius spoke.<div eID="g3" type="x-p"/>'
)
_OSIS_NT = ('<div canonical="true" eID="g2" osisID="Gen" type="book"/>'
            '<div canonical="true" osisID="Matt" sID="g4" type="book"/><div sID="g5" type="x-p"/>The book of the '
            'genealogy.<l sID="l1"/>A line of verse.')


def _ztext(directory: Path, testament: str, osis: str, cuts: tuple[int, ...] = ()) -> None:
    """A SWORD zText testament: the UTF-8 text cut at byte offsets ``cuts`` into zlib blocks (after an empty one),
    and its index."""
    raw_text = osis.encode()
    bounds = [0, *cuts, len(raw_text)]
    index, data = b"", b""
    for raw in [b"", *(raw_text[a:b] for a, b in zip(bounds, bounds[1:], strict=False))]:
        packed = zlib.compress(raw) if raw else b""
        index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
    (directory / f"{testament}.bzs").write_bytes(index)
    (directory / f"{testament}.bzz").write_bytes(data)


def test_a_sword_module_reads_as_one_document_per_book_without_markup_or_notes(tmp_path: Path) -> None:
    from qfilters.data.bible import MODULE_DIR

    module = tmp_path / MODULE_DIR
    module.mkdir(parents=True)
    apostrophe = _OSIS_OT.encode().index("\u2019".encode())
    # blocks cut mid-tag and mid-character: the text is read whole, then split into books
    _ztext(module, "ot", _OSIS_OT, (40, apostrophe + 1))
    _ztext(module, "nt", _OSIS_NT)
    genesis, matthew = parse_bible(tmp_path)
    assert (genesis.title, matthew.title) == ("Gen", "Matt")  # the front matter is not a book
    # a note between two words stood for the space between them
    assert genesis.text == ("Genesis\n\nIn the beginning, God created the heavens. God\u2019s Spirit moved and "
                            "Samellius spoke.\n")
    assert matthew.text == "The book of the genealogy.\nA line of verse.\n"
    (module / "nt.bzs").write_bytes(b"\0" * 13)
    with pytest.raises(ValueError, match="12-byte"):
        parse_bible(tmp_path)
    with pytest.raises(FileNotFoundError, match="sword-text-web"):
        parse_bible(tmp_path / "elsewhere")


def test_a_ztext_block_whose_size_disagrees_with_its_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ot.bzz").write_bytes(zlib.compress(b"abc"))
    (tmp_path / "ot.bzs").write_bytes(struct.pack("<III", 0, len(zlib.compress(b"abc")), 4))
    with pytest.raises(ValueError, match="index says 4"):
        read_ztext(tmp_path / "ot.bzs", tmp_path / "ot.bzz")


@needs_apt
def test_bible_from_the_real_sword_text_web_package() -> None:
    corpus = load_corpus("bible")
    titles = [d.title for d in corpus.documents]
    assert titles[:5] == ["Gen", "Exod", "Lev", "Num", "Deut"] and titles[-1] == "Rev" and len(titles) > 66
    assert re.fullmatch(r"sword-text-web \S+ \(World English Bible\)", corpus.source)
    genesis = corpus.documents[0].text
    assert "In the beginning, God created the heavens and the earth." in genesis
    assert "<" not in "".join(d.text for d in corpus.documents)  # no markup survives
    assert "Elohim" not in genesis[:3000]  # footnotes are dropped


# --------------------------------------------------------------------------------------------------- apt failures


def test_missing_apt_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with pytest.raises(DatasetUnavailableError) as info:
        load_corpus("austen", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "not found on PATH" in message and "apt-get update" in message


@needs_apt
def test_unknown_package_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError) as info:
        debian.fetch_package("qfilters-no-such-package", cache_dir=tmp_path)
    assert "qfilters-no-such-package" in str(info.value) and "apt-get update" in str(info.value)


@needs_apt
def test_failed_download_leaves_no_partial_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian, "APT_GET", "false")  # apt-cache works, the download itself fails
    with pytest.raises(DatasetUnavailableError) as info:
        load_corpus("austen", cache_dir=tmp_path)
    assert "apt-get download r-cran-janeaustenr` failed" in str(info.value)
    assert "apt-get update" in str(info.value)
    assert list((tmp_path / "corpora" / "debian").iterdir()) == []


# --------------------------------------------------------------------------------------------------- Hugging Face


def test_hf_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # both libraries read these at import time, and may have been imported already by other tests
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets", raising=False)
    with pytest.raises(DatasetUnavailableError) as info:
        load_corpus("hf:qfilters-test/no-such-dataset:test")
    message = str(info.value)
    assert "hf:qfilters-test/no-such-dataset::test:text" in message
    assert "offline" in message and "local corpus" in message


def test_hf_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DatasetUnavailableError, match=r"pip install 'qfilters\[hf\]'"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1:test:text")


# --------------------------------------------------------------------------------------------------- tokens


def _word_tokenizer(words: list[str], with_bos: bool = True):  # type: ignore[no-untyped-def]
    """A word-level tokenizer built offline: one id per whitespace-separated word."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(sorted(set(words)))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<s>"} if with_bos else {}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]",
                                                **special)  # fmt: skip


def _corpus(*texts: str) -> Corpus:
    return Corpus("test", [Document(f"d{i}", t) for i, t in enumerate(texts)], "test")


def test_token_chunks_exact_lengths_and_budget() -> None:
    texts = [" ".join(f"w{i}" for i in range(10)), " ".join(f"v{i}" for i in range(7)), "u0 u1 u2 u3 u4"]
    tokenizer = _word_tokenizer(" ".join(texts).split())
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    stream = [1, *ids[0], 1, *ids[1], 1, *ids[2]]  # BOS starts every document
    assert len(stream) == 25

    chunks = list(iter_token_chunks(tokenizer, _corpus(*texts), seq_len=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 4, 1]  # only the corpus running out shortens a chunk
    assert [t for c in chunks for t in c] == stream
    assert chunks == list(iter_token_chunks(tokenizer, _corpus(*texts), seq_len=4))  # deterministic

    for max_tokens, expected in [(10, [4, 4]), (12, [4, 4, 4]), (4, [4]), (100, [4] * 6 + [1])]:
        got = list(iter_token_chunks(tokenizer, _corpus(*texts), seq_len=4, max_tokens=max_tokens))
        assert [len(c) for c in got] == expected
        assert sum(len(c) for c in got) <= max_tokens
        assert [t for c in got for t in c] == stream[: sum(expected)]

    no_bos = [t for c in iter_token_chunks(tokenizer, _corpus(*texts), seq_len=5, add_bos=False) for t in c]
    assert no_bos == [*ids[0], 2, *ids[1], 2, *ids[2]]  # EOS between documents only
    eos_only = _word_tokenizer(" ".join(texts).split(), with_bos=False)
    assert [t for c in iter_token_chunks(eos_only, _corpus(*texts), seq_len=5) for t in c] == no_bos

    with pytest.raises(ValueError, match="seq_len"):  # raised at call time, before any iteration
        iter_token_chunks(tokenizer, _corpus(*texts), seq_len=0)
    with pytest.raises(ValueError, match="max_tokens=3 is smaller than seq_len=4"):
        iter_token_chunks(tokenizer, _corpus(*texts), seq_len=4, max_tokens=3)


def test_token_chunks_are_lazy_and_bounded() -> None:
    words = [f"w{i}" for i in range(50)]
    tokenizer = _word_tokenizer(words)
    long_doc = "\n\n".join(" ".join(words[(i + j) % 50] for j in range(40)) for i in range(300))  # ~70k chars
    calls: list[int] = []

    class Spy:
        bos_token_id, eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            calls.append(len(text))
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    corpus = _corpus(long_doc, *["w1 w2 w3"] * 1000)
    whole = tokenizer.encode(long_doc, add_special_tokens=False)
    chunks = list(iter_token_chunks(Spy(), corpus, seq_len=64, max_tokens=len(whole) + 1))
    assert max(calls) <= PIECE_CHARS and len(calls) > 10  # the long document went in pieces
    assert sum(calls) < len(long_doc) + 100  # ... and the 1000 short documents were never tokenized
    assert [t for c in chunks for t in c] == [1, *whole][: 64 * len(chunks)]  # pieces == whole-text tokens
    assert all(len(c) == 64 for c in chunks)


def test_import_is_cheap() -> None:
    heavy = ("torch", "transformers", "datasets")
    code = f"import sys, qfilters.data; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
