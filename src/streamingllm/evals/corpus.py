"""Long texts to evaluate on: Jane Austen's novels, text files or stdin, Hugging Face datasets.

* :func:`austen_text` -- Jane Austen's six novels as one long plain text, offline after the first
  fetch. The text comes from the Debian package ``r-cran-janeaustenr`` (the R package
  *janeaustenr*, MIT licence). The first call downloads the ``.deb`` with ``apt-get download``,
  unpacks it with ``dpkg-deb -x`` and reads the R lazy-load database
  ``janeaustenr/data/Rdata.{rdx,rdb}`` with the optional ``rdata`` package (the ``evals`` extra).
  Each novel is then cached as one UTF-8 text file, so later calls need no network.
* :func:`read_texts`, :func:`hub_dataset_text` -- files (``"-"`` = stdin) and hub datasets.
* :class:`TextSource` -- exactly one of those sources, checked before anything is read, with a
  short name for titles; :func:`tokenize_window` -- the token ids of a window of a text.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checks import ArgumentError, check_choice, check_int, check_optional_int
from ..extras import require

__all__ = [
    "AUSTEN_NOVELS", "CORPORA", "CorpusError", "TextSource", "austen_text", "check_window", "default_cache_dir",
    "hub_dataset_text", "read_texts", "tokenize_window",
]

log = logging.getLogger(__name__)

DEB_PACKAGE = "r-cran-janeaustenr"

#: Object names in the R package, in publication order (1811-1817, with the two
#: posthumous novels in the order of their joint edition).  This is the order in
#: which :func:`austen_text` concatenates them by default.
AUSTEN_NOVELS: tuple[str, ...] = (
    "sensesensibility",  # Sense and Sensibility, 1811
    "prideprejudice",  # Pride and Prejudice, 1813
    "mansfieldpark",  # Mansfield Park, 1814
    "emma",  # Emma, 1815
    "northangerabbey",  # Northanger Abbey, 1817
    "persuasion",  # Persuasion, 1817
)


#: Built-in corpora, by the name :class:`TextSource` takes: all six novels, or one
#: (``austen:persuasion``, say: the novel ``streamingllm pretrain`` holds out by default).
CORPORA: tuple[str, ...] = ("austen", *(f"austen:{n}" for n in AUSTEN_NOVELS))


class CorpusError(ValueError):
    """A text could not be produced (bad argument, unreadable file, download or parse failure)."""


def default_cache_dir() -> Path:
    """Root cache folder: ``$STREAMINGLLM_CACHE``, else ``$XDG_CACHE_HOME/streamingllm``,
    else ``~/.cache/streamingllm``.  The novels live in its ``austen/`` subfolder."""
    if os.environ.get("STREAMINGLLM_CACHE"):
        return Path(os.environ["STREAMINGLLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "streamingllm"


def austen_text(
    cache_dir: str | os.PathLike[str] | None = None,
    novels: Sequence[str] | None = None,
    *,
    deb_path: str | os.PathLike[str] | None = None,
) -> str:
    """Return Austen's novels as one plain-text string.

    Args:
        cache_dir: root cache folder; the novels are stored as
            ``<cache_dir>/austen/<novel>.txt`` (UTF-8).  ``None`` means
            :func:`default_cache_dir`.  A folder pre-populated with these files
            makes the function work fully offline.
        novels: names from :data:`AUSTEN_NOVELS` (a single name is also
            accepted), returned in the given order; ``None`` means all six in
            the order of :data:`AUSTEN_NOVELS`.
        deb_path: a local ``r-cran-janeaustenr`` ``.deb`` to parse instead of
            downloading one; only used when some novel is not cached yet.

    Returns:
        Each novel's lines joined with ``"\\n"``, novels separated by ``"\\n\\n"``.

    Raises:
        CorpusError: unknown novel name, download failure or parse failure.
    """
    if novels is None:
        novels = AUSTEN_NOVELS
    elif isinstance(novels, str):
        novels = (novels,)
    unknown = [n for n in novels if n not in AUSTEN_NOVELS]
    if unknown:
        raise CorpusError(f"unknown novel(s) {unknown}; allowed names: {', '.join(AUSTEN_NOVELS)}")

    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "austen"
    paths = {n: folder / f"{n}.txt" for n in novels}
    if not all(p.is_file() for p in paths.values()):
        _populate_cache(folder, deb_path)
    return "\n\n".join(paths[n].read_bytes().decode("utf-8") for n in novels)


def _populate_cache(folder: Path, deb_path: str | os.PathLike[str] | None) -> None:
    """Extract all six novels from the .deb (downloaded if ``deb_path`` is None) into ``folder``."""
    _require_rdata()  # before any download
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="austen-") as tmp:
        tmp_dir = Path(tmp)
        deb = Path(deb_path) if deb_path is not None else _download_deb(tmp_dir)
        texts = _extract_novels(deb, tmp_dir / "root")
    for name, text in texts.items():
        _atomic_write(folder / f"{name}.txt", text)
    log.info("cached %d Austen novels under %s", len(texts), folder)


def _download_deb(dest: Path) -> Path:
    """Run ``apt-get download`` into ``dest`` (retrying once after ``apt-get update``)."""
    hint = (
        f"could not download the Debian package {DEB_PACKAGE!r} with apt-get; the Debian "
        f"archive must be reachable. Alternatively pass deb_path=, or use a cache_dir "
        f"pre-populated with austen/<novel>.txt files ({', '.join(AUSTEN_NOVELS)})"
    )
    if shutil.which("apt-get") is None:
        raise CorpusError(f"apt-get not found: {hint}")
    log.info("downloading %s with apt-get", DEB_PACKAGE)
    cmd = ["apt-get", "download", "-q", DEB_PACKAGE]
    result = _run(cmd, cwd=dest)
    if result.returncode != 0:  # package lists may be missing or stale
        _run(["apt-get", "update", "-q"], cwd=dest)
        result = _run(cmd, cwd=dest)
    debs = sorted(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise CorpusError(f"{hint}. apt-get said: {result.stderr.strip()[-500:]}")
    return debs[0]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(cmd, 1, "", str(exc))


def _extract_novels(deb: Path, root: Path) -> dict[str, str]:
    """Unpack ``deb`` into ``root`` and return ``{novel: text}`` for all six novels."""
    if not deb.is_file():
        raise CorpusError(f"no such .deb file: {deb}")
    if shutil.which("dpkg-deb") is None:
        raise CorpusError("dpkg-deb not found; it is needed to unpack the .deb")
    result = _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=deb.parent)
    if result.returncode != 0:
        raise CorpusError(f"dpkg-deb could not unpack {deb}: {result.stderr.strip()[-500:]}")
    rdx = next(root.rglob("janeaustenr/data/Rdata.rdx"), None)
    if rdx is None:
        raise CorpusError(f"{deb} has no janeaustenr/data/Rdata.rdx; is it {DEB_PACKAGE}?")
    try:
        return _read_lazyload(rdx, rdx.with_suffix(".rdb"))
    except CorpusError:
        raise
    except Exception as exc:  # rdata / zlib / numpy errors on a malformed file
        raise CorpusError(f"could not parse the R data in {rdx.parent}: {exc!r}") from exc


def _require_rdata():
    return require("rdata", "Austen corpus downloads")  # only the first fetch needs it


def _read_lazyload(rdx: Path, rdb: Path) -> dict[str, str]:
    """Read the novels from an R lazy-load database.

    ``Rdata.rdx`` is a (gzip) serialized R list whose ``variables`` entry maps
    object names to ``(offset, length)`` in bytes into ``Rdata.rdb``; each such
    block is a 4-byte big-endian uncompressed size followed by a zlib stream of
    an R serialization (here a character vector, one element per line).
    """
    rdata = _require_rdata()

    index = rdata.conversion.convert(rdata.parser.parse_data(rdx.read_bytes(), extension=".rds"))
    variables = index["variables"]
    blob = rdb.read_bytes()
    texts = {}
    for name in AUSTEN_NOVELS:
        if name not in variables:
            raise CorpusError(f"{rdx} has no object {name!r}; found {sorted(map(str, variables))}")
        offset, length = (int(v) for v in variables[name])
        raw = zlib.decompress(blob[offset + 4 : offset + length])
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        texts[name] = "\n".join("" if line is None else str(line) for line in lines)
    return texts


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` via a temp file in the same folder + rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# Other text sources: files, stdin, Hugging Face datasets
# --------------------------------------------------------------------------------------


def read_texts(paths: Sequence[str | os.PathLike[str]], stdin=None) -> str:
    """The files in ``paths`` read as UTF-8 and concatenated in order (like the paper's
    concatenated books), separated by a blank line; ``"-"`` reads ``stdin`` (default ``sys.stdin``)."""
    parts = []
    for path in paths:
        if str(path) == "-":
            parts.append((stdin or sys.stdin).read())
            continue
        try:
            parts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise CorpusError(f"cannot read text file {path}: {reason}") from err
    return "\n\n".join(parts)


def hub_dataset_text(name: str, split: str = "test", field: str = "text", max_chars: int | None = None) -> str:
    """Texts of a Hugging Face dataset (e.g. ``"emozilla/pg19"``) joined by blank lines.

    Streams the split row by row and stops once ``max_chars`` characters are collected, so a
    long book corpus is not downloaded whole. Needs the optional ``datasets`` package (the ``hub``
    extra) and a reachable hub (or its local cache).

    Args:
        name: dataset id on the hub.
        split: the split to read (e.g. ``"test"``).
        field: the column holding the text.
        max_chars: stop after this many characters (None = the whole split).
    """
    datasets = require("datasets", f"Hugging Face datasets such as {name!r}")
    parts, total = [], 0
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
        for row in rows:
            if field not in row:
                raise CorpusError(f"dataset {name!r} has no text column {field!r}; columns: {sorted(row)}")
            parts.append(row[field])
            total += len(row[field])
            if max_chars is not None and total >= max_chars:
                break
    except CorpusError:
        raise
    except Exception as err:  # offline hub, unknown dataset or split, network errors: all surface here
        first = str(err).strip().split("\n")[0] or type(err).__name__
        raise CorpusError(
            f"could not read dataset {name!r} (split {split!r}) from the Hugging Face hub: {first}. "
            "Is the hub reachable (HF_HUB_OFFLINE unset) and the name right? Offline, use text files or the austen corpus"
        ) from err
    if not parts:
        raise CorpusError(f"dataset {name!r} split {split!r} holds no rows")
    return "\n\n".join(parts)


#: Characters read per wanted token, surely enough for any tokenizer on prose (grown if not).
CHARS_PER_TOKEN = 12


@dataclass(frozen=True)
class TextSource:
    """Exactly one text to evaluate on: files (``"-"`` = stdin), a built-in corpus, or a hub dataset.

    Checked when built, so a bad choice fails before a model is loaded; :meth:`read` fetches it.

    Attributes:
        files: text files, concatenated in order.
        corpus: a name from :data:`CORPORA`.
        dataset: a Hugging Face dataset id, with its ``dataset_split`` and ``dataset_field``.
    """

    files: tuple[str, ...] = ()
    corpus: str | None = None
    dataset: str | None = None
    dataset_split: str = "test"
    dataset_field: str = "text"

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(str(f) for f in self.files or ()))
        if self.corpus is not None:
            check_choice("corpus", self.corpus, CORPORA)
        given = [name for name, on in (("files", self.files), ("corpus", self.corpus), ("dataset", self.dataset)) if on]
        if len(given) != 1:
            raise CorpusError(
                "give exactly one text source: text files ('-' = stdin), a corpus "
                f"(--corpus austen, or austen:NOVEL for one novel) or a Hugging Face dataset (--dataset NAME); "
                f"got {' and '.join(given) or 'none'}"
            )

    @property
    def name(self) -> str:
        """A short name for titles: the files' names (not their folders), the corpus or the dataset."""
        if self.corpus:
            novel = self.corpus.partition(":")[2]
            return f"Austen's {novel}" if novel else "Austen's novels"
        if self.dataset:
            return self.dataset
        names = ["stdin" if f == "-" else Path(f).name for f in self.files]
        return ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} and {len(names) - 2} more files"

    def read(self, max_tokens: int | None = None, stdin=None) -> str:
        """The text (not empty). ``max_tokens``: a dataset is read only as far as that many tokens need."""
        if self.files:
            text = read_texts(self.files, stdin)
        elif self.corpus:
            novel = self.corpus.partition(":")[2]
            text = austen_text(novels=[novel] if novel else None)
        else:
            need = None if max_tokens is None else max_tokens * CHARS_PER_TOKEN
            text = hub_dataset_text(self.dataset, self.dataset_split, self.dataset_field, max_chars=need)
        if not text.strip():
            raise CorpusError(f"the text of {self.name} is empty: give some text")
        return text


def check_window(offset: int = 0, num_tokens: int | None = None) -> tuple[int, int | None]:
    """``offset`` (>= 0) and ``num_tokens`` (>= 2 or None = to the end), checked (see :func:`tokenize_window`)."""
    return check_int("offset", offset, 0), check_optional_int("num_tokens", num_tokens, 2)


def tokenize_window(tokenizer, text: str, offset: int = 0, num_tokens: int | None = None) -> list[int]:
    """Token ids ``[offset, offset + num_tokens)`` of ``text``, after the tokenizer's BOS if it adds one.

    The window starts as the model saw texts start in training (with BOS, when the tokenizer adds
    one), whatever the offset; the BOS counts towards ``num_tokens``. Only as much of the text is
    tokenized as the window needs. Warns when the text is shorter than asked.

    Raises:
        ArgumentError: a bad ``offset`` or ``num_tokens``, or an ``offset`` that leaves fewer than 2 tokens.
        ValueError: the text gives fewer than 2 tokens.
    """
    offset, num_tokens = check_window(offset, num_tokens)
    budget = None if num_tokens is None else (offset + num_tokens) * CHARS_PER_TOKEN
    while True:
        piece = text if budget is None or budget >= len(text) else text[:budget]
        ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        if num_tokens is None or len(ids) >= offset + num_tokens + 1 or piece is text:
            break
        budget *= 4
    ids = ids[offset:]
    probe = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids
    if num_tokens is not None:
        ids = ids[:num_tokens]
    if len(ids) < 2:
        if offset:
            raise ArgumentError("offset", f"leaves {len(ids)} token(s) of the text: need at least 2", offset)
        raise CorpusError(f"the text gives {len(ids)} token(s): need at least 2 to score one")
    if num_tokens is not None and len(ids) < num_tokens:
        warnings.warn(f"the text has only {len(ids):,} tokens after offset {offset} (asked for {num_tokens:,})",
                      stacklevel=2)
    return ids
