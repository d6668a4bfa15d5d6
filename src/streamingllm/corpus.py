"""Jane Austen's six novels as one long plain text, offline after the first fetch.

The text comes from the Debian package ``r-cran-janeaustenr`` (the R package
*janeaustenr*, MIT licence).  The first call downloads the ``.deb`` with
``apt-get download``, unpacks it with ``dpkg-deb -x`` and reads the R lazy-load
database ``janeaustenr/data/Rdata.{rdx,rdb}`` with the ``rdata`` package.  Each
novel is then cached as one UTF-8 text file, so later calls need no network.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path



__all__ = ["AUSTEN_NOVELS", "CorpusError", "austen_text", "default_cache_dir", "hub_dataset_text", "read_texts"]

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


class CorpusError(RuntimeError):
    """The corpus could not be produced (bad argument, download or parse failure)."""


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


def _read_lazyload(rdx: Path, rdb: Path) -> dict[str, str]:
    """Read the novels from an R lazy-load database.

    ``Rdata.rdx`` is a (gzip) serialized R list whose ``variables`` entry maps
    object names to ``(offset, length)`` in bytes into ``Rdata.rdb``; each such
    block is a 4-byte big-endian uncompressed size followed by a zlib stream of
    an R serialization (here a character vector, one element per line).
    """
    import rdata  # only needed for the first fetch; keeps `import streamingllm.cli` light

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
    concatenated books), separated by a blank line; ``"-"`` reads ``stdin``."""
    parts = []
    for path in paths:
        if str(path) == "-":
            import sys

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
    long book corpus is not downloaded whole. Needs the optional ``datasets`` package and a
    reachable hub (or its local cache).

    Args:
        name: dataset id on the hub.
        split: the split to read (e.g. ``"test"``).
        field: the column holding the text.
        max_chars: stop after this many characters (None = the whole split).
    """
    try:
        import datasets
    except ImportError as err:
        raise CorpusError(
            f"--dataset {name}: reading Hugging Face datasets needs the optional package `datasets` "
            "(pip install datasets); alternatively pass text files or --corpus austen"
        ) from err
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
            "Is the hub reachable (HF_HUB_OFFLINE unset) and the name right? Offline, use text files or --corpus austen"
        ) from err
    if not parts:
        raise CorpusError(f"dataset {name!r} split {split!r} holds no rows")
    return "\n\n".join(parts)
