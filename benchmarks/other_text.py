"""Held-out text from outside this repository and outside the training corpora, for `minilm-eval --text`.

  python benchmarks/other_text.py --out /tmp/other.txt
  minilm-eval --workdir DIR --no-finetune --text /tmp/other.txt --out DIR_other

Paragraphs of English prose that a Debian machine carries and no Python docstring holds: the licence texts
in /usr/share/common-licenses, the last 60 git release notes in /usr/share/doc/git/RelNotes and Perl's
.pod documentation. A paragraph is kept when it has two sentences or more, 200 characters or more, and is
at least 70% letters (no tables or code); blank lines separate them in the output (one document each).
The README's "other text" columns were measured on what this wrote on the project's machine (1,478
paragraphs, 549 KB); another machine's files give other text, which is the point.
"""

import argparse
import glob
import os
import re


def paragraphs(files):
  for f in files:
    if not os.path.isfile(f):
      continue
    try:
      with open(f, encoding="utf-8") as fh:
        text = fh.read()
    except (UnicodeDecodeError, OSError):
      continue
    for p in re.split(r"\n\s*\n", text):
      p = " ".join(p.split())
      if p.startswith("=") or len(p) < 200 or len(re.findall(r"[.!?](\s|$)", p)) < 2:
        continue
      if sum(c.isalpha() for c in p) / len(p) >= 0.7:
        yield p


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  a = ap.parse_args()
  files = (sorted(glob.glob("/usr/share/common-licenses/*"))
           + sorted(glob.glob("/usr/share/doc/git/RelNotes/*.txt"))[-60:]
           + sorted(glob.glob("/usr/share/perl/5.*.*/**/*.pod", recursive=True)))
  paras = list(paragraphs(files))  # as measured: licences linked under two names appear twice
  if not paras:
    raise SystemExit("no paragraphs found: this machine has none of the files listed in the docstring")
  with open(a.out, "w", encoding="utf-8") as f:
    f.write("\n\n".join(paras))
  print(f"{len(paras)} paragraphs, {os.path.getsize(a.out)} bytes in {a.out}")


if __name__ == "__main__":
  main()
