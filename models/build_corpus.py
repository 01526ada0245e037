"""Build the bundled text corpora from Python's standard library (docstrings, comments, code).

- `kvpress/data/pydoc_{train,heldout}.txt.gz`: the docstrings and comments (natural English text),
  one module after another, each introduced by a line `# <module path>`: haystack of the
  retrieval tasks, training text of `models/needle-llama`, held-out text for perplexity.
- `kvpress/data/pycode_train.txt.gz`: the source code of the training modules (training text:
  code repeats names within a file, which teaches a model to copy from its context).

All ASCII. Source and licence: see `kvpress/data/SOURCES.md`. Run with the interpreter whose standard library you want to extract:

    python models/build_corpus.py            # reads sysconfig's stdlib dir, writes kvpress/data/

Held-out rule: a module goes to the held-out split when crc32(its relative path) % 20 == 0
(about 5% of modules), so the split is stable and does not depend on file order.
"""

import argparse
import ast
import gzip
import inspect
import io
import os
import sysconfig
import tokenize
import zlib

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings"}


def clean(text: str) -> str:
    """Keep printable ASCII plus newlines and tabs; drop everything else."""
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


def extract(source: str) -> str:
    """Docstrings (module, class, function) and comment blocks of one module, in source order."""
    pieces = []  # (line, text)
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) > 40:
                line = node.body[0].lineno if node.body else 0
                pieces.append((line, doc))
    block, start = [], 0
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            letters = sum(c.isalpha() for c in text)
            if tok.start[0] <= 2 and ("coding" in text or text.startswith("!")):
                continue
            if letters >= 0.5 * len(text) and letters > 0:
                if not block:
                    start = tok.start[0]
                block.append(text)
                continue
        if tok.type in (tokenize.NL, tokenize.COMMENT):
            continue
        if block:
            text = " ".join(block)
            if len(text) > 40:
                pieces.append((start, text))
            block = []
    pieces.sort(key=lambda p: p[0])
    return clean("\n\n".join(text for _, text in pieces))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "kvpress", "data"))
    args = parser.parse_args()

    docs = {"train": [], "heldout": []}
    code = []
    for root, dirs, files in os.walk(args.stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, args.stdlib)
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                text = extract(source)
            except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
                continue
            if len(text) < 200:
                continue
            split = "heldout" if zlib.crc32(rel.encode()) % 20 == 0 else "train"
            docs[split].append(f"# {rel}\n\n{text}")
            if split == "train":
                code.append(f"# {rel}\n\n{clean(source)}")
    for name, items in (("pydoc_train", docs["train"]), ("pydoc_heldout", docs["heldout"]), ("pycode_train", code)):
        out = os.path.join(args.out, f"{name}.txt.gz")
        data = ("\n\n".join(items) + "\n").encode("ascii")
        with gzip.GzipFile(out, "wb", mtime=0) as f:  # mtime=0: byte-identical rebuilds
            f.write(data)
        print(f"{name}: {len(items)} modules, {len(data) / 1e6:.2f} MB text, {os.path.getsize(out) / 1e6:.2f} MB gz")


if __name__ == "__main__":
    main()
