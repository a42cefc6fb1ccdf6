"""Held-out text from outside this repository and outside the training corpora, for `minilm-eval --text`.

  python benchmarks/other_text.py --out /tmp/other.txt
  python benchmarks/other_text.py --source rust-book --out /tmp/book.txt
  minilm-eval --workdir DIR --no-finetune --text /tmp/other.txt --out DIR_other

Paragraphs of English prose that no Python docstring holds, from files this machine carries:
- `usr-share` (the default): the licence texts in /usr/share/common-licenses, the last 60 git release
  notes in /usr/share/doc/git/RelNotes and Perl's .pod documentation;
- `rust-book`: the paragraphs (<p>) of "The Rust Programming Language", the book rustup installs with a
  toolchain (~/.rustup/toolchains/*/share/doc/rust/html/book/ch*.html), in chapter order.
A paragraph is kept when it has two sentences or more, 200 characters or more, and is at least 70%
letters (no tables or code); blank lines separate them in the output (one document each). docs/experiments.md's
"other text" columns were measured on what this wrote on the project's machine (`usr-share`: 1,478
paragraphs, 549 KB; `rust-book`: 1,736 paragraphs, 698 KB, rustup's stable toolchain); another
machine's files give other text, which is the point.
"""

import argparse
import glob
import html.parser
import os
import re


def keep(p: str) -> bool:
  return (not p.startswith("=") and len(p) >= 200 and len(re.findall(r"[.!?](\s|$)", p)) >= 2
          and sum(c.isalpha() for c in p) / len(p) >= 0.7)


def read(f: str):
  """The file's text, or None when it is not a readable UTF-8 file."""
  if not os.path.isfile(f):
    return None
  try:
    with open(f, encoding="utf-8") as fh:
      return fh.read()
  except (UnicodeDecodeError, OSError):
    return None


def paragraphs(files):
  """Blank-line separated paragraphs of plain-text files, whitespace collapsed."""
  for text in filter(None, map(read, files)):
    for p in re.split(r"\n\s*\n", text):
      p = " ".join(p.split())
      if keep(p):
        yield p


class _Paragraphs(html.parser.HTMLParser):
  """The text of every <p> element (inline markup such as <code> kept as its text)."""

  def __init__(self):
    super().__init__()
    self.found, self._open = [], None

  def handle_starttag(self, tag, attrs):
    if tag == "p":
      self._open = []

  def handle_endtag(self, tag):
    if tag == "p" and self._open is not None:
      self.found.append(" ".join("".join(self._open).split()))
      self._open = None

  def handle_data(self, data):
    if self._open is not None:
      self._open.append(data)


def html_paragraphs(files):
  for text in filter(None, map(read, files)):
    parser = _Paragraphs()
    parser.feed(text)
    yield from filter(keep, parser.found)


def rust_book_files():
  home = os.path.expanduser("~/.rustup/toolchains")
  books = sorted(glob.glob(f"{home}/stable-*/share/doc/rust/html/book")) or \
      sorted(glob.glob(f"{home}/*/share/doc/rust/html/book"))  # stable's book when there is one
  return sorted(glob.glob(os.path.join(books[0], "ch*.html"))) if books else []


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--source", choices=("usr-share", "rust-book"), default="usr-share")
  a = ap.parse_args()
  if a.source == "rust-book":
    paras = list(html_paragraphs(rust_book_files()))
  else:
    files = (sorted(glob.glob("/usr/share/common-licenses/*"))
             + sorted(glob.glob("/usr/share/doc/git/RelNotes/*.txt"))[-60:]
             + sorted(glob.glob("/usr/share/perl/5.*.*/**/*.pod", recursive=True)))
    paras = list(paragraphs(files))  # as measured: licences linked under two names appear twice
  if not paras:
    raise SystemExit(f"no paragraphs found: this machine has none of the {a.source} files the docstring "
                     "lists")
  with open(a.out, "w", encoding="utf-8") as f:
    f.write("\n\n".join(paras))
  print(f"{len(paras)} paragraphs, {os.path.getsize(a.out)} bytes in {a.out}")


if __name__ == "__main__":
  main()
