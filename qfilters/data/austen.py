"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, read without R.

The package stores each novel as a character vector (one element per printed line, ``""`` between paragraphs) in
the R lazy-load database ``data/Rdata.rdb``/``.rdx``; :mod:`.rdata` decodes it. Documents are ordered
alphabetically by R object name (emma, mansfieldpark, northangerabbey, persuasion, prideprejudice,
sensesensibility) and titled with the book titles janeaustenr itself uses. Other objects are ignored.
"""

from __future__ import annotations

from pathlib import Path

from qfilters.data.corpus import Document
from qfilters.data.rdata import LazyLoadDB, RVector
from qfilters.errors import DatasetUnavailableError

PACKAGE = "r-cran-janeaustenr"
DATA_BASE = "usr/lib/R/site-library/janeaustenr/data/Rdata"
#: Bump when parsing changes, so cached parses are redone.
PARSER_VERSION = 1

NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride & Prejudice",
    "sensesensibility": "Sense & Sensibility",
}


def parse_austen(package_root: Path) -> list[Document]:
    """The six novels as documents: lines joined by newlines, so paragraphs stay separated by blank lines."""
    database = LazyLoadDB(package_root / DATA_BASE)
    missing = sorted(set(NOVELS) - set(database.names))
    if missing:
        raise DatasetUnavailableError(f"{database.base}: janeaustenr data lacks {', '.join(missing)}; "
                                      f"found only {', '.join(database.names)}.")
    documents = []
    for name in sorted(NOVELS):
        lines = database[name]
        if not isinstance(lines, RVector) or lines.rtype != "character":
            raise DatasetUnavailableError(f"{database.base}: {name!r} is not a character vector")
        text = "\n".join(line or "" for line in lines).strip("\n")
        documents.append(Document(NOVELS[name], text))
    return documents
