"""Real English sentences with no download: the docstrings of Python's standard library.

Sentences are collected deterministically (sorted module names, fixed filters), then split into
disjoint calibration and evaluation sets by a hash of the sentence, so calibrating on one and
evaluating on the other never mixes them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator
from functools import lru_cache

# Modules with plenty of prose docstrings, importable everywhere CPython is.
_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures "
    "configparser contextlib copy csv dataclasses datetime decimal difflib email enum fileinput "
    "fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html http.client "
    "imaplib inspect io ipaddress itertools json logging mailbox mimetypes multiprocessing netrc "
    "numbers operator optparse os pathlib pickle pkgutil platform poplib pprint queue random re "
    "sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl "
    "statistics string struct subprocess tarfile tempfile textwrap threading timeit tokenize "
    "traceback types typing unittest urllib.parse urllib.request uuid warnings weakref zipfile"
).split()

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"^[A-Za-z][A-Za-z ,;:'()\-]+[.!?]$")


def docstrings(module_names, *, methods: bool = False) -> Iterator[str]:
    """Docstrings of each module, then of its own classes and functions (sorted by name), and of the
    classes' methods with ``methods=True``; modules that fail to import are skipped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in module_names:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            objs = [module]
            for _, obj in sorted(vars(module).items()):
                if getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj):
                    objs.append(obj)
                    if methods:
                        objs += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
                elif inspect.isfunction(obj):
                    objs.append(obj)
            for obj in objs:
                yield inspect.getdoc(obj) or ""


@lru_cache(maxsize=1)
def all_sentences() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for doc in docstrings(_MODULES):
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            for s in _SENTENCE.split(text):
                words = s.split()
                if 6 <= len(words) <= 40 and _WORD.match(s) and s not in seen:
                    seen.add(s)
                    out.append(s)
    return tuple(out)


def _bucket(sentence: str) -> int:
    return hashlib.sha256(sentence.encode()).digest()[0]


def sentences(split: str, n: int) -> list[str]:
    """``n`` sentences of ``split`` ('calib' or 'eval'); the two splits never share a sentence."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    want_eval = split == "eval"
    pool = [s for s in all_sentences() if (_bucket(s) < 160) == want_eval]
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} {split} sentences available, asked for {n}")
    return pool[:n]


if __name__ == "__main__":
    s = all_sentences()
    print(len(s), "sentences;", len(sentences("eval", 512)), "eval")
    print("\n".join(s[:5]))
