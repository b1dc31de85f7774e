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
import hashlib
import html
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
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


# ------------------------------------------------------------------- the large preset: every *-doc package

@dataclass(frozen=True)
class DocPackage:
    package: str
    source: str  # the Debian source package: the unit of the train/held-out split
    size: int  # bytes of the .deb
    description: str = ""


# Descriptions of packages that hold generated API references (Doxygen, Javadoc, gtk-doc ...): class and
# function listings, not prose.
_API_DESCRIPTION = re.compile(r"\bAPI\b|doxygen|javadoc|gtk-doc|reference (manual|documentation) generated", re.I)
# Package families whose documentation is generated from code: Haskell (Haddock) and Java (Javadoc) libraries.
_GENERATED_FAMILY = re.compile(r"^libghc-.*-doc$|-java-doc$")


def parse_dumpavail(text: str) -> list[DocPackage]:
    """`apt-cache dumpavail` -> the `*-doc` packages (one per name, the first stanza wins)."""
    found: dict[str, DocPackage] = {}
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package", "")
        if not name.endswith("-doc") or name in found:
            continue
        source = fields.get("Source", name).split()[0]  # "Source: foo (1.2-3)" names a different version
        found[name] = DocPackage(name, source, int(fields.get("Size", "0") or 0), fields.get("Description", ""))
    return list(found.values())


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_heldout(source_package: str, heldout_percent: float) -> bool:
    """Deterministic split by Debian source package: every binary package built from one source lands in the
    same split, so no manual, copied README or shared doc tree can be in both."""
    return _stable_hash("heldout:" + source_package) % 10000 < heldout_percent * 100


def select_packages(candidates: list[DocPackage], max_deb_mb: float, budget_mb: float,
                    exclude_api: bool = True) -> tuple[list[DocPackage], dict[str, int]]:
    """Pick packages in a deterministic pseudo-random order (hash of the name, so the choice is not biased
    towards the start of the alphabet) until the download budget is spent."""
    skipped = {"api_reference_description": 0, "generated_family": 0, "deb_too_large": 0, "over_budget": 0}
    chosen, total = [], 0
    for pkg in sorted(candidates, key=lambda c: (_stable_hash("order:" + c.package), c.package)):
        if exclude_api and _API_DESCRIPTION.search(pkg.description):
            skipped["api_reference_description"] += 1
        elif exclude_api and _GENERATED_FAMILY.search(pkg.package):
            skipped["generated_family"] += 1
        elif pkg.size > max_deb_mb * 1e6:
            skipped["deb_too_large"] += 1
        elif total + pkg.size > budget_mb * 1e6:
            skipped["over_budget"] += 1
        else:
            chosen.append(pkg)
            total += pkg.size
    return sorted(chosen, key=lambda c: c.package), skipped


# Path rules, checked before a file is read. Each names the reason counted in the manifest.
_LANGS = ("af ar bg bn ca cs cy da de el eo es et eu fa fi fr ga gl gu he hi hr hu hy id is it ja ka kk km kn ko "
          "lt lv mk ml mn mr ms nb ne nl nn no oc pa pl pt ro ru si sk sl sq sr sv ta te th tl tr ug uk ur uz vi "
          "zh zh_cn zh_tw zh-cn zh-tw pt_br pt-br").split()
_LANG_ALT = "|".join(re.escape(x) for x in sorted(_LANGS, key=len, reverse=True))
_TRANSLATION_DIR = re.compile(rf"/(?:{_LANG_ALT})(?:[_-][a-z]{{2}})?(?:\.utf-?8)?/|/(?:translations?|i18n|l10n|locale|po)/",
                              re.I)
_TRANSLATION_SUFFIX = re.compile(rf"[._-](?:{_LANG_ALT})\.(?:html?|txt|md|rst)(?:\.gz)?$", re.I)
_CHANGELOG = re.compile(r"/(?:changelog|changes|news|history|release[-_]?notes?|whatsnew)[^/]*$", re.I)
_LICENCE = re.compile(r"/(?:copyright|copying|licen[cs]e|gpl|lgpl|notice|authors|thanks|credits|"
                      r"readme\.(?:debian|source))[^/]*$", re.I)
_GENERATED = re.compile(r"/(?:_sources|_modules|_static|_images|_downloads|search|gtk-doc|apidocs?|javadoc|doxygen|index-files)/|"
                        r"/(?:genindex|py-modindex|modindex|search|objects\.inv|index-all|allclasses[^/]*|"
                        r"deprecated-list|overview-tree|package-tree|package-summary|package-frame|"
                        r"globals[^/]*|functions[^/]*|namespacemembers[^/]*|annotated|hierarchy)\.", re.I)
_TEXT_EXT = re.compile(r"\.(html?|xhtml|txt|text|rst|md|markdown|pod|info(?:-\d+)?)(?:\.gz)?$", re.I)
_PLAIN_NAMES = re.compile(r"/(?:readme|faq|intro(?:duction)?|tutorial|howto|guide|manual)(?:\.gz)?$", re.I)


def path_verdict(path: str) -> str | None:
    """None when the file may hold English prose, else the reason it is skipped."""
    path = "/" + path.lstrip("./")
    if not path.startswith("/usr/share/doc/") and not path.startswith("/usr/share/info/"):
        return "outside_doc_dirs"
    if not (_TEXT_EXT.search(path) or _PLAIN_NAMES.search(path)):
        return "not_text_format"
    if _TRANSLATION_DIR.search(path) or _TRANSLATION_SUFFIX.search(path):
        return "translation"
    if _CHANGELOG.search(path):
        return "changelog"
    if _LICENCE.search(path):
        return "licence_or_credits"
    if _GENERATED.search(path):
        return "generated_index"
    return None


def file_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    if name.endswith(".rst"):
        return "rst"
    if name.endswith((".md", ".markdown")):
        return "markdown"
    if name.endswith(".pod"):
        return "pod"
    if re.search(r"\.info(-\d+)?$", name):
        return "info"
    return "text"


def info_to_text(source: str) -> str:
    """GNU info -> text: node separators, node header lines and menu markers dropped."""
    out = []
    for line in source.splitlines():
        if line.startswith("\x1f") or line.startswith("File: ") or line.strip() == "* Menu:":
            continue
        out.append(line.replace("\x7f", "").rstrip())
    return _tidy("\n".join(out))


FILE_EXTRACTORS = {**EXTRACTORS, "info": info_to_text, "text": _tidy}

# Pages a documentation generator wrote from source code; their <meta name="generator"> or footer says so.
_GENERATED_HTML = re.compile(r"generated by (?:doxygen|javadoc|gtk-doc|epydoc|pydoctor|rdoc|yard|naturaldocs)|"
                             r"produced by (?:<a [^>]*>)?haddock|"
                             r'name="generator" content="(?:doxygen|javadoc|gtk-doc|epydoc|pydoctor)', re.I)

# Common English function words. Prose uses them in a third or more of its words; translations, code listings and
# generated API tables use far fewer.
_ENGLISH_WORDS = frozenset(
    "the of and to a in is that for it as with be on this are by or an not can from which if you at was but "
    "will have has its they we all there their one when also use used may should must then these other into "
    "more than only any each so such would how what".split())
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def english_share(text: str) -> float:
    """Share of the words in `text` that are common English function words (0 when it has no words)."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    return sum(w.lower() in _ENGLISH_WORDS for w in words) / len(words)


def letters_share(text: str) -> float:
    visible = len(text) - sum(text.count(c) for c in " \n\t")
    return sum(c.isascii() and c.isalpha() for c in text) / max(1, visible)


@dataclass(frozen=True)
class Filters:
    min_chars: int = 500
    max_chars: int = 2_000_000
    min_english_share: float = 0.20
    min_letters_share: float = 0.60


def text_verdict(text: str, filters: Filters) -> str | None:
    """None when extracted text is kept, else the reason it is dropped."""
    if len(text) < filters.min_chars:
        return "too_short"
    if len(text) > filters.max_chars:
        return "too_long"
    if letters_share(text) < filters.min_letters_share:
        return "not_letters"  # tables of numbers, encoded data, scripts other than Latin
    if english_share(text) < filters.min_english_share:
        return "not_english_prose"
    return None


def documents_from_files(files: Iterator[tuple[str, bytes]], filters: Filters, counts: Counter) -> Iterator[dict]:
    """(path, raw bytes) pairs of one package -> its kept documents; every drop is counted under its reason."""
    for path, raw in files:
        counts["files_seen"] += 1
        reason = path_verdict(path)
        if reason is None:
            if path.endswith(".gz"):
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError):
                    reason = "unreadable"
            source = raw.decode("utf-8", errors="replace")
            fmt = file_format(path)
            if reason is None and len(source) > 4 * filters.max_chars:
                reason = "too_long"  # checked before extraction: parsing a huge generated page costs minutes
            if reason is None and fmt == "html" and _GENERATED_HTML.search(source[:20000] + source[-5000:]):
                reason = "generated_api_page"
            if reason is None:
                text = FILE_EXTRACTORS[fmt](source)
                reason = text_verdict(text, filters)
        if reason is not None:
            counts["dropped_" + reason] += 1
            continue
        counts["files_kept"] += 1
        yield {"text": text, "path": "/" + path.lstrip("./")}


_MAX_MEMBER = 16 << 20  # bytes; larger single files are data, not manuals


def deb_files(deb: Path) -> Iterator[tuple[str, bytes]]:
    """Regular files of a .deb (path, bytes) without installing or unpacking it to disk."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and 0 < member.size <= _MAX_MEMBER:
                    name = member.name.lstrip("./")
                    if path_verdict(name) is None:
                        yield name, tar.extractfile(member).read()
                    else:
                        yield name, b""  # counted by documents_from_files, never read
    finally:
        proc.stdout.close()
        proc.wait()


def _package_documents(job: tuple[str, str, Filters]) -> tuple[str, list[dict], Counter]:
    package, deb, filters = job
    counts: Counter = Counter()
    try:
        docs = list(documents_from_files(deb_files(Path(deb)), filters, counts))
    except (tarfile.TarError, OSError):
        counts["dropped_unreadable_deb"] += 1
        docs = []
    return package, docs, counts


def normalized_hashes(text: str) -> tuple[bytes, bytes]:
    """(exact, near) keys: the exact key ignores case and white space; the near key keeps only the letters,
    so copies that differ in version numbers, punctuation or layout (one manual shipped by two releases) collide."""
    lowered = text.lower()
    exact = hashlib.blake2b(" ".join(lowered.split()).encode(), digest_size=16).digest()
    near = hashlib.blake2b(re.sub(r"[^a-z]+", "", lowered).encode(), digest_size=16).digest()
    return exact, near


class Deduplicator:
    """Document-level exact and near-duplicate removal. Feed the training split first: a document that is also in
    the held-out split is then dropped from held-out, never from training, and never kept in both."""

    def __init__(self):
        self.exact: set[bytes] = set()
        self.near: set[bytes] = set()

    def verdict(self, text: str) -> str | None:
        exact, near = normalized_hashes(text)
        if exact in self.exact:
            return "exact_duplicate"
        if near in self.near:
            return "near_duplicate"
        self.exact.add(exact)
        self.near.add(near)
        return None


def download_debs(directory: Path, packages: list[str], batch: int = 200) -> list[str]:
    """`apt-get download` the packages not yet in `directory` (a rerun resumes); the names apt could not fetch."""
    directory.mkdir(parents=True, exist_ok=True)
    # As root, apt drops to the _apt user, which cannot write into a user's directory, and warns once per batch.
    apt = ["apt-get", "download", "-q"] + (["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else [])
    have = {p.name.split("_", 1)[0] for p in directory.glob("*.deb")}
    todo = [p for p in packages if p not in have]
    failed = []
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        if subprocess.run([*apt, *part], cwd=directory,
                          stdout=subprocess.DEVNULL).returncode != 0:
            have = {p.name.split("_", 1)[0] for p in directory.glob("*.deb")}
            for name in part:  # one bad name fails the batch: retry the missing ones alone
                if name not in have and subprocess.run([*apt, name], cwd=directory,
                                                       stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.DEVNULL).returncode != 0:
                    failed.append(name)
    return failed


def build_large(args, out: Path) -> int:
    started = time.monotonic()
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    candidates = parse_dumpavail(dump)
    chosen, skipped = select_packages(candidates, args.max_deb_mb, args.download_budget_mb)
    debs = Path(args.fetch_debs or out.parent / "debs")
    print(f"{len(candidates)} *-doc packages in the archive; {len(chosen)} chosen "
          f"({sum(c.size for c in chosen) / 1e6:.0f} MB of .debs) -> {debs}", flush=True)
    failed = download_debs(debs, [c.package for c in chosen])
    deb_of = {p.name.split("_", 1)[0]: p for p in sorted(debs.glob("*.deb"))}
    by_name = {c.package: c for c in chosen}
    # Training packages first (see Deduplicator), each split in name order: the output is deterministic.
    ordered = sorted((c for c in chosen if c.package in deb_of),
                     key=lambda c: (is_heldout(c.source, args.heldout_percent), c.package))
    filters = Filters(args.min_chars, args.max_chars, args.min_english_share, args.min_letters_share)
    return write_corpus(out, ordered, deb_of, filters, args, by_name, failed, skipped, len(candidates), started)


def split_paths(out: Path) -> tuple[Path, Path, Path]:
    stem = out.name.removesuffix(".jsonl")
    return out, out.with_name(stem + ".heldout.jsonl"), out.with_name(stem + ".manifest.json")


def write_corpus(out, ordered, deb_of, filters, args, by_name, failed, skipped, n_candidates, started) -> int:
    train_path, heldout_path, manifest_path = split_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dedup = Deduplicator()
    counts: Counter = Counter()
    splits = {s: {"packages": [], "source_packages": set(), "documents": 0, "characters": 0} for s in ("train", "heldout")}
    jobs = [(c.package, str(deb_of[c.package]), filters) for c in ordered]
    tmp = {s: p.with_name(p.name + ".tmp") for s, p in (("train", train_path), ("heldout", heldout_path))}
    files = {s: open(p, "w", encoding="utf-8") for s, p in tmp.items()}
    try:
        with multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else _Serial() as pool:
            for i, (package, docs, package_counts) in enumerate(pool.imap(_package_documents, jobs, chunksize=4)):
                counts.update(package_counts)
                info = by_name[package]
                split = "heldout" if is_heldout(info.source, args.heldout_percent) else "train"
                kept = 0
                for doc in docs:
                    reason = dedup.verdict(doc["text"])
                    if reason:
                        counts["dropped_" + reason] += 1
                        continue
                    record = {"text": doc["text"], "source": info.source, "package": package, "path": doc["path"]}
                    files[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                    splits[split]["documents"] += 1
                    splits[split]["characters"] += len(doc["text"])
                    kept += 1
                if kept:
                    splits[split]["packages"].append(package)
                    splits[split]["source_packages"].add(info.source)
                if (i + 1) % 100 == 0 or i + 1 == len(jobs):
                    total = sum(s["characters"] for s in splits.values())
                    print(f"{i + 1}/{len(jobs)} packages, {total / 1e6:.1f}M characters kept, "
                          f"{time.monotonic() - started:.0f}s", flush=True)
    finally:
        for f in files.values():
            f.close()
    tmp["train"].replace(train_path)
    tmp["heldout"].replace(heldout_path)
    manifest = build_manifest(splits, counts, filters, args, failed, skipped, n_candidates, started,
                              {"train": train_path.name, "heldout": heldout_path.name})
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    for s, v in manifest["splits"].items():
        print(f"{s:<8} {v['source_packages']:>5} source packages {v['documents']:>7} documents "
              f"{v['characters'] / 1e6:>8.1f}M characters ~{v['estimated_tokens'] / 1e6:.1f}M tokens")
    print(f"-> {train_path}, {heldout_path}, {manifest_path}")
    return 0


class _Serial:
    """Stands in for a process pool when --workers 1 (tests, debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, jobs, chunksize=1):
        return map(fn, jobs)


CHARS_PER_TOKEN = 4.0  # the project's 32k byte-level BPE on this kind of text (docs/data.md)


def build_manifest(splits, counts, filters, args, failed, skipped, n_candidates, started, files) -> dict:
    return {
        "schema": "effdist.english_corpus.v1",
        "preset": args.preset,
        "files": files,
        "splits": {name: {"documents": s["documents"], "characters": s["characters"],
                          "estimated_tokens": int(s["characters"] / CHARS_PER_TOKEN),
                          "source_packages": len(s["source_packages"]), "packages": sorted(s["packages"])}
                   for name, s in splits.items()},
        "split_rule": {"by": "debian_source_package", "heldout_percent": args.heldout_percent,
                       "hash": "sha256('heldout:' + source) first 8 bytes % 10000 < heldout_percent * 100"},
        "selection": {"candidates": n_candidates, "rule": "binary packages named *-doc, description not an API "
                      "reference, not libghc-*-doc or *-java-doc, .deb <= max_deb_mb, pseudo-random order by sha256 of the name until the budget",
                      "max_deb_mb": args.max_deb_mb, "download_budget_mb": args.download_budget_mb,
                      "skipped": skipped, "download_failed": sorted(failed)},
        "filters": {"min_chars": filters.min_chars, "max_chars": filters.max_chars,
                    "min_english_share": filters.min_english_share, "min_letters_share": filters.min_letters_share,
                    "paths": "only /usr/share/doc and /usr/share/info; text formats; no translations, changelogs, "
                             "licences/credits, generated indexes or API pages",
                    "dedup": "document level: exact (case and white space folded) and near (letters only)"},
        "counts": dict(sorted(counts.items())),
        "chars_per_token_estimate": CHARS_PER_TOKEN,
        "build_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build an English jsonl corpus from Debian documentation packages.")
    p.add_argument("--preset", choices=("small", "large"), default="small",
                   help="small: 14 curated manuals, ~20M tokens, one file; large: every suitable *-doc package, "
                        "80M+ tokens, train and held-out files split by source package (docs/data.md)")
    p.add_argument("--output", default=None, help="jsonl to write (one document per line; default "
                   "data/english/corpus.jsonl, for large data/english-large/corpus.jsonl)")
    p.add_argument("--root", default="/", help="small: file system root the packages are installed under (default /)")
    p.add_argument("--fetch-debs", metavar="DIR", default=None,
                   help="download the .deb files into DIR with apt-get (small: and unpack them there) instead of "
                        "installing; large always downloads, by default into <output dir>/debs")
    p.add_argument("--sources", default=",".join(s.name for s in SOURCES),
                   help="small: comma-separated subset of: " + ", ".join(s.name for s in SOURCES))
    p.add_argument("--min-chars", type=int, default=None,
                   help="drop documents shorter than this (index pages, stubs); default 200 small, 500 large")
    p.add_argument("--print-packages", action="store_true", help="print the Debian packages to fetch and exit")
    large = p.add_argument_group("large preset")
    large.add_argument("--heldout-percent", type=float, default=3.0,
                       help="share of Debian source packages (by hash of the name) that go to the held-out file")
    large.add_argument("--download-budget-mb", type=float, default=2500, help="most MB of .debs to download")
    large.add_argument("--max-deb-mb", type=float, default=30, help="skip packages whose .deb is larger")
    large.add_argument("--max-chars", type=int, default=2_000_000, help="drop documents longer than this")
    large.add_argument("--min-english-share", type=float, default=Filters.min_english_share,
                       help="least share of words that are common English function words (prose test)")
    large.add_argument("--min-letters-share", type=float, default=Filters.min_letters_share,
                       help="least share of visible characters that are ASCII letters")
    large.add_argument("--workers", type=int, default=2, help="processes that read and extract packages")
    args = p.parse_args(argv)
    if args.preset == "large":
        out = Path(args.output or "data/english-large/corpus.jsonl")
        args.min_chars = 500 if args.min_chars is None else args.min_chars
        if not 0 <= args.heldout_percent < 100:
            p.error(f"--heldout-percent {args.heldout_percent} is out of range; give a share in [0, 100)")
        if args.print_packages:
            dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
            chosen, _ = select_packages(parse_dumpavail(dump), args.max_deb_mb, args.download_budget_mb)
            print(" ".join(c.package for c in chosen))
            return 0
        return build_large(args, out)
    return build_small(args, p)


def build_small(args, p: argparse.ArgumentParser) -> int:
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

    out = Path(args.output or "data/english/corpus.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    min_chars = 200 if args.min_chars is None else args.min_chars
    per_source = {}
    with open(tmp, "w", encoding="utf-8") as f:
        for source, package in zip(chosen, packages):
            n_docs = n_chars = 0
            for doc in documents(source, root, min_chars):
                f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                n_docs += 1
                n_chars += len(doc["text"])
            print(f"{source.name:<16} {n_docs:>6} documents {n_chars / 1e6:>8.1f}M characters")
            per_source[source.name] = {"package": package, "documents": n_docs, "characters": n_chars}
    tmp.replace(out)
    total_docs = sum(s["documents"] for s in per_source.values())
    total_chars = sum(s["characters"] for s in per_source.values())
    manifest = {"schema": "effdist.english_corpus.v1", "preset": "small", "files": {"train": out.name},
                "splits": {"train": {"documents": total_docs, "characters": total_chars,
                                     "estimated_tokens": int(total_chars / CHARS_PER_TOKEN),
                                     "source_packages": len(per_source), "packages": sorted(packages)}},
                "sources": per_source, "filters": {"min_chars": min_chars},
                "chars_per_token_estimate": CHARS_PER_TOKEN}
    split_paths(out)[2].write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{'total':<16} {total_docs:>6} documents {total_chars / 1e6:>8.1f}M characters -> {out}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
