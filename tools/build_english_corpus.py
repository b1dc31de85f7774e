#!/usr/bin/env python
"""Build an English text corpus (JSON lines, one document per source file) from documentation that
Debian ships as packages: the Python, Linux kernel, Perl, PostgreSQL, Django, SQLAlchemy, Git,
Node.js, GIMP, pandas, SciPy, CMake and Sphinx manuals and the Debian Administrator's Handbook.
About 80M characters of text, roughly 20M tokens with a 32k byte-level BPE. Everything comes from
the Debian archive through apt; nothing else is downloaded.

Either install the packages (as root) and read them from /:

    apt-get install -y --no-install-recommends $(python tools/build_english_corpus.py --print-packages)
    python tools/build_english_corpus.py --output data/english/corpus.jsonl

or let the tool fetch the .deb files with `apt-get download` and unpack them without installing:

    python tools/build_english_corpus.py --fetch-debs data/english/debs --output data/english/corpus.jsonl

Markup is reduced to plain text per format (reStructuredText, POD, AsciiDoc, Markdown, HTML); code
examples stay in, as they do in web text. See docs/data.md for the full pipeline.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path


# ------------------------------------------------------------------------------------ text extraction

_RST_UNDERLINE = re.compile(r"^\s*([=\-~^*+#`:'\".])\1{3,}\s*$")
_RST_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_TITLED_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$")


def _role_text(match: re.Match) -> str:
    inner = match.group(1)
    titled = _RST_TITLED_TARGET.match(inner)
    return (titled.group(1) if titled else inner).lstrip("~!")


def rst_to_text(source: str) -> str:
    """reStructuredText -> text: directive and comment lines dropped (their indented bodies kept),
    section underlines dropped, roles/links/literals reduced to their text."""
    out = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped == "..":
            continue
        if _RST_UNDERLINE.match(line):
            continue
        if stripped.startswith(":") and re.match(r"^:[\w -]+:(\s|$)", stripped):
            continue  # field lists such as :synopsis: / :platform:
        line = _RST_ROLE.sub(_role_text, line)
        line = _RST_LINK.sub(r"\1", line)
        line = _RST_LITERAL.sub(r"\1", line)
        line = _RST_REF.sub(r"\1", line)
        out.append(line.rstrip())
    return _tidy("\n".join(out))


_POD_CODE_BIG = re.compile(r"[A-Z]<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_CODE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(match: re.Match) -> str:
    code, inner = match.group(1), match.group(2)
    if code in ("X", "Z"):
        return ""
    if code == "E":
        return _POD_ESCAPES.get(inner, html.unescape(f"&{inner};"))
    if code == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner.split("/", 1)[-1].strip('"')
    return inner


def pod_to_text(source: str) -> str:
    """Perl POD -> text: =head/=item keep their text, other commands are dropped, formatting codes
    (B<> I<> C<> L<> E<> ...) are replaced by their content."""
    out = []
    in_block = False
    for line in source.splitlines():
        if line.startswith("=begin"):
            in_block = True
            continue
        if line.startswith("=end"):
            in_block = False
            continue
        if in_block:
            continue
        if line.startswith("="):
            command, _, rest = line.partition(" ")
            if command.startswith("=head") or command == "=item":
                line = rest.strip().lstrip("*").strip()
            else:
                continue
        line = _POD_CODE_BIG.sub(lambda m: m.group(1), line)
        for _ in range(4):  # nested codes, innermost first
            line, n = _POD_CODE.subn(_pod_code, line)
            if not n:
                break
        out.append(line.rstrip())
    return _tidy("\n".join(out))


_ADOC_LINKGIT = re.compile(r"linkgit:([\w.-]+)\[\d\]")
_ADOC_MARKUP = re.compile(r"(?<![\w`])([`'*_+]{1,2})([^`'*_+\n]+?)\1(?![\w`])")


def asciidoc_to_text(source: str) -> str:
    """AsciiDoc (Git's manuals) -> text: delimiter/underline lines, attributes and includes dropped."""
    out = []
    for line in source.splitlines():
        stripped = line.strip()
        if _RST_UNDERLINE.match(line) or re.match(r"^(include|ifdef|ifndef|endif)::", stripped):
            continue
        if re.match(r"^:[\w-]+:", stripped) or re.match(r"^\[\[?[^\]]*\]\]?$", stripped):
            continue
        line = _ADOC_LINKGIT.sub(r"\1", line)
        line = _ADOC_MARKUP.sub(r"\2", line)
        out.append(line.rstrip())
    return _tidy("\n".join(out))


_MD_COMMENT = re.compile(r"<!--.*?-->", re.S)
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_REF_DEF = re.compile(r"^\[[^\]]+\]:\s+\S+.*$", re.M)


def markdown_to_text(source: str) -> str:
    """Markdown -> text: comments and reference definitions dropped, links reduced to their text."""
    text = _MD_COMMENT.sub("", source)
    text = _MD_REF_DEF.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    lines = [re.sub(r"^#{1,6}\s+", "", line).rstrip() for line in text.splitlines()]
    return _tidy("\n".join(lines))


class _HTMLText(HTMLParser):
    """Visible text of an HTML page without navigation: scripts, styles, nav/header/footer and
    elements whose class or id marks them as navigation, sidebars or footers are skipped."""

    SKIP_TAGS = {"script", "style", "nav", "header", "footer", "head", "noscript", "svg", "button", "form"}
    SKIP_MARK = re.compile(r"nav|sidebar|footer|header|related|breadcrumb|menu|search|toc|headerlink|prev-next|"
                           r"left-prev|right-next", re.I)
    BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr",
                  "table", "blockquote", "section", "article", "br", "hr", "figcaption"}
    VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool]] = []  # (tag, starts a skipped subtree)
        self.skipping = 0
        self.in_pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK_TAGS and not self.skipping:
            self.parts.append("\n")
        if tag in self.VOID_TAGS:
            return
        marks = " ".join(v or "" for k, v in attrs if k in ("class", "id", "role"))
        skip = tag in self.SKIP_TAGS or bool(marks and self.SKIP_MARK.search(marks) and "main" not in marks)
        self.stack.append((tag, skip))
        self.skipping += skip
        self.in_pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.VOID_TAGS or not any(t == tag for t, _ in self.stack):
            return
        while self.stack:  # unclosed <p>/<li> inside the closing element close with it
            t, skip = self.stack.pop()
            self.skipping -= skip
            self.in_pre -= t == "pre"
            if t == tag:
                break
        if tag in self.BLOCK_TAGS and not self.skipping:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skipping:
            return
        if not self.in_pre:
            data = re.sub(r"\s+", " ", data)
            if self._at_line_start():
                data = data.lstrip()
        if data:
            self.parts.append(data)

    def _at_line_start(self) -> bool:
        return not self.parts or self.parts[-1].endswith("\n")


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return _tidy("".join(parser.parts).replace("\u00b6", ""))  # without Sphinx's pilcrow permalinks


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


EXTRACTORS: dict[str, Callable[[str], str]] = {"rst": rst_to_text, "pod": pod_to_text, "asciidoc": asciidoc_to_text,
                                              "markdown": markdown_to_text, "html": html_to_text}


# ------------------------------------------------------------------------------------------ sources

@dataclass(frozen=True)
class Source:
    name: str
    package: str  # Debian package (a metapackage is resolved to the versioned one it depends on)
    patterns: tuple[str, ...]  # globs relative to the root file system
    fmt: str
    exclude: tuple[str, ...] = field(default=())  # substrings of paths to leave out


SOURCES = (
    Source("python", "python3-doc", ("usr/share/doc/python3.*/html/_sources/**/*.rst.txt",), "rst"),
    Source("linux", "linux-doc", ("usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz",
                                  "usr/share/doc/linux-doc-*/Documentation/**/*.txt.gz",
                                  "usr/share/doc/linux-doc-*/Documentation/ABI/**/*.gz"), "rst",
           exclude=("/translations/", "/devicetree/")),
    Source("perl", "perl-doc", ("usr/share/perl/*/pod/*.pod",), "pod"),
    Source("postgresql", "postgresql-doc", ("usr/share/doc/postgresql-doc-*/html/*.html",), "html"),
    Source("django", "python-django-doc", ("usr/share/doc/python-django-doc/html/**/*.html",), "html",
           exclude=("/_modules/", "genindex", "py-modindex", "search.html")),
    Source("sqlalchemy", "python-sqlalchemy-doc", ("usr/share/doc/python-sqlalchemy-doc/rst/**/*.rst",), "rst"),
    Source("git", "git-doc", ("usr/share/doc/git-doc/*.txt",), "asciidoc"),
    Source("nodejs", "nodejs-doc", ("usr/share/doc/nodejs/api/*.md.gz", "usr/share/doc/nodejs/api/*.md"), "markdown"),
    Source("gimp", "gimp-help-en", ("usr/share/gimp/2.0/help/en/**/*.html",), "html"),
    Source("pandas", "python-pandas-doc", ("usr/share/doc/python-pandas-doc/html/**/*.html",), "html",
           exclude=("/_sources/", "/_modules/", "genindex", "search.html")),
    Source("scipy", "python-scipy-doc", ("usr/share/doc/python-scipy-doc/html/**/*.html",), "html",
           exclude=("/_sources/", "/_modules/", "genindex", "search.html")),
    Source("cmake", "cmake-doc", ("usr/share/doc/cmake-data/html/_sources/**/*.rst.txt",), "rst"),
    Source("sphinx", "sphinx-doc", ("usr/share/doc/sphinx-doc/html/_sources/**/*.rst.txt",), "rst"),
    Source("debian-handbook", "debian-handbook", ("usr/share/doc/debian-handbook/html/en-US/*.html",), "html"),
)


def read_file(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def source_files(source: Source, root: Path) -> list[Path]:
    # Keyed by the resolved path: Debian links some doc directories under two names (python3.11-doc -> python3.11).
    found: dict[Path, Path] = {}
    for pattern in source.patterns:
        for p in sorted(root.glob(pattern)):
            if p.is_file() and not any(x in str(p) for x in source.exclude):
                found.setdefault(p.resolve(), p)
    return sorted(found.values())


def documents(source: Source, root: Path, min_chars: int) -> Iterator[dict]:
    extract = EXTRACTORS[source.fmt]
    for path in source_files(source, root):
        text = extract(read_file(path))
        if len(text) >= min_chars:
            yield {"text": text, "source": source.name, "path": str(path.relative_to(root))}


# ------------------------------------------------------------------------------------ Debian packages

def _unversioned(package: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[\d.]+", "", package)).strip("-")


def resolve_package(name: str) -> str:
    """A metapackage such as python3-doc -> the versioned package it depends on (python3.11-doc)."""
    out = subprocess.run(["apt-cache", "depends", name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            dep = line.split(":", 1)[1].strip().strip("<>")
            if dep != name and _unversioned(dep) == _unversioned(name):
                return dep
    return name


def fetch_debs(directory: Path, packages: list[str]) -> Path:
    """`apt-get download` the packages into `directory` and unpack them under directory/root."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *packages], cwd=directory, check=True)
    root = directory / "root"
    root.mkdir(exist_ok=True)
    for deb in sorted(directory.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build an English jsonl corpus from Debian documentation packages.")
    p.add_argument("--output", default="data/english/corpus.jsonl", help="jsonl to write (one document per line)")
    p.add_argument("--root", default="/", help="file system root the packages are installed under (default /)")
    p.add_argument("--fetch-debs", metavar="DIR", default=None,
                   help="download the .deb files into DIR with apt-get and unpack them there instead of installing")
    p.add_argument("--sources", default=",".join(s.name for s in SOURCES),
                   help="comma-separated subset of: " + ", ".join(s.name for s in SOURCES))
    p.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this (index pages, stubs)")
    p.add_argument("--print-packages", action="store_true", help="print the Debian packages to install and exit")
    args = p.parse_args(argv)

    chosen = [s for s in SOURCES if s.name in args.sources.split(",")]
    unknown = set(args.sources.split(",")) - {s.name for s in SOURCES}
    if unknown:
        p.error(f"unknown sources {sorted(unknown)}; valid: {', '.join(s.name for s in SOURCES)}")
    packages = [resolve_package(s.package) for s in chosen]
    if args.print_packages:
        print(" ".join(packages))
        return 0
    root = fetch_debs(Path(args.fetch_debs), packages) if args.fetch_debs else Path(args.root)

    missing = [(s, pkg) for s, pkg in zip(chosen, packages) if not source_files(s, root)]
    if missing:
        names = " ".join(pkg for _, pkg in missing)
        print(f"no files for {', '.join(s.name for s, _ in missing)} under {root}. Install them with\n"
              f"  apt-get install -y --no-install-recommends {names}\n"
              f"or run with --fetch-debs DIR to download and unpack them without installing.", file=sys.stderr)
        return 1

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    total_docs = total_chars = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for source in chosen:
            n_docs = n_chars = 0
            for doc in documents(source, root, args.min_chars):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc["text"])
            print(f"{source.name:<16} {n_docs:>6} documents {n_chars / 1e6:>8.1f}M characters")
            total_docs += n_docs
            total_chars += n_chars
    tmp.replace(out)
    print(f"{'total':<16} {total_docs:>6} documents {total_chars / 1e6:>8.1f}M characters -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
