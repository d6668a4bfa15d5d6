"""Tests for streamingllm.evals.corpus (offline except the one marked ``network``)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

from streamingllm.checks import ArgumentError
from streamingllm.evals import corpus
from streamingllm.evals.corpus import AUSTEN_NOVELS, CorpusError, TextSource, austen_text, tokenize_window


def _apt_download_possible() -> bool:
    """True when apt-get/dpkg-deb exist, apt knows the package and its archive host answers."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    try:
        out = subprocess.run(
            ["apt-get", "download", "--print-uris", corpus.DEB_PACKAGE],
            capture_output=True, text=True, timeout=30, cwd="/",
        ).stdout
        url = urlparse(out.split()[0].strip("'"))
        socket.create_connection((url.hostname, url.port or 80), timeout=5).close()
        return True
    except (OSError, IndexError, subprocess.SubprocessError):
        return False


def _no_download(*args, **kwargs):
    raise AssertionError("download attempted although the cache is complete")


@pytest.fixture
def fake_cache(tmp_path):
    """A cache dir holding a tiny distinct text for every novel."""
    folder = tmp_path / "austen"
    folder.mkdir()
    texts = {name: f"{name} line 1\n{name} line 2 £" for name in AUSTEN_NOVELS}
    for name, text in texts.items():
        (folder / f"{name}.txt").write_bytes(text.encode("utf-8"))
    return tmp_path, texts


def test_publication_order():
    """The documented order (the order austen_text concatenates) is publication order, 1811-1817."""
    assert AUSTEN_NOVELS == (
        "sensesensibility", "prideprejudice", "mansfieldpark",
        "emma", "northangerabbey", "persuasion",
    )


def test_unknown_novel_names_allowed_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "_download_deb", _no_download)
    with pytest.raises(CorpusError) as info:
        austen_text(tmp_path, novels=["emma", "ulysses"])
    message = str(info.value)
    assert "ulysses" in message
    assert all(name in message for name in AUSTEN_NOVELS)


def test_cached_files_are_used_in_documented_order(fake_cache, monkeypatch):
    cache_dir, texts = fake_cache
    monkeypatch.setattr(corpus, "_download_deb", _no_download)
    monkeypatch.setattr(corpus, "_extract_novels", _no_download)
    assert austen_text(cache_dir) == "\n\n".join(texts[n] for n in AUSTEN_NOVELS)
    assert austen_text(str(cache_dir), novels=["persuasion", "emma"]) == (
        texts["persuasion"] + "\n\n" + texts["emma"]
    )
    assert austen_text(cache_dir, novels="emma") == texts["emma"]


def test_default_cache_dir_from_env(fake_cache, monkeypatch):
    cache_dir, texts = fake_cache
    monkeypatch.setattr(corpus, "_download_deb", _no_download)
    monkeypatch.setenv("STREAMINGLLM_CACHE", str(cache_dir))
    assert corpus.default_cache_dir() == cache_dir
    assert austen_text(novels=["emma"]) == texts["emma"]
    monkeypatch.delenv("STREAMINGLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    assert corpus.default_cache_dir() == cache_dir / "streamingllm"


def test_incomplete_cache_triggers_download(fake_cache, monkeypatch):
    cache_dir, _ = fake_cache
    (cache_dir / "austen" / "emma.txt").unlink()

    def failing_download(dest):
        raise CorpusError("simulated download failure")

    monkeypatch.setattr(corpus, "_download_deb", failing_download)
    with pytest.raises(CorpusError, match="simulated"):
        austen_text(cache_dir, novels=["emma"])


def test_missing_apt_get_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError) as info:
        austen_text(tmp_path)
    message = str(info.value)
    assert corpus.DEB_PACKAGE in message and "archive" in message and "cache_dir" in message


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not available")
def test_bad_deb_raises_corpus_error(tmp_path):
    bad = tmp_path / "bogus.deb"
    bad.write_bytes(b"this is not a debian package")
    with pytest.raises(CorpusError, match="dpkg-deb"):
        austen_text(tmp_path / "cache", deb_path=bad)
    assert not list((tmp_path / "cache" / "austen").glob("*.txt"))


@pytest.mark.network
@pytest.mark.skipif(not _apt_download_possible(), reason="apt-get download of r-cran-janeaustenr not possible")
def test_real_download_and_parse(tmp_path, monkeypatch):
    start = time.perf_counter()
    text = austen_text(tmp_path)
    elapsed = time.perf_counter() - start
    assert "It is a truth universally acknowledged" in text
    assert len(text) > 4_000_000
    assert text.startswith("SENSE AND SENSIBILITY\n")
    positions = [text.index(title) for title in (
        "SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK",
        "EMMA\n\nBy Jane Austen", "NORTHANGER ABBEY", "Persuasion\n\n\nby",
    )]
    assert positions == sorted(positions)
    files = sorted(p.name for p in (tmp_path / "austen").iterdir())
    assert files == sorted(f"{n}.txt" for n in AUSTEN_NOVELS)  # no leftover temp files
    parts = {n: austen_text(tmp_path, novels=[n]) for n in AUSTEN_NOVELS}
    assert "\n\n".join(parts[n] for n in AUSTEN_NOVELS) == text
    sizes = {n: len(t) for n, t in parts.items()}
    print(f"first fetch {elapsed:.1f}s; characters per novel: {sizes}")
    # Second call must come from the cache alone.
    monkeypatch.setattr(corpus, "_download_deb", _no_download)
    monkeypatch.setattr(corpus, "_extract_novels", _no_download)
    assert austen_text(tmp_path) == text


# --- text sources and token windows ---------------------------------------------------------


def test_a_text_that_cannot_be_read_is_a_corpus_error_naming_the_file(tmp_path):
    """Each way reading fails names the file and why, as a CorpusError; library callers that catch
    ValueError catch it too."""
    missing, latin1, blank = tmp_path / "missing.txt", tmp_path / "latin1.txt", tmp_path / "blank.txt"
    latin1.write_bytes("café".encode("latin-1"))
    blank.write_text(" \n\n ")
    with pytest.raises(CorpusError, match=f"^cannot read text file {re.escape(str(missing))}: No such file"):
        TextSource(files=[missing]).read()
    with pytest.raises(ValueError, match=f"^cannot read text file {re.escape(str(latin1))}: 'utf-8' codec") as info:
        TextSource(files=[latin1]).read()
    assert isinstance(info.value, CorpusError)
    with pytest.raises(CorpusError, match="^the text of blank.txt is empty: give some text$"):
        TextSource(files=[blank]).read()
    with pytest.raises(CorpusError, match="^the text gives 1 token\\(s\\): need at least 2 to score one$"):
        tokenize_window(Words(bos=False), "a")


@pytest.mark.parametrize(
    "kwargs, got",
    [(dict(), "none"), (dict(files=["a.txt"], corpus="austen"), "files and corpus"),
     (dict(corpus="austen", dataset="x/y"), "corpus and dataset")],
)
def test_exactly_one_text_source(kwargs, got):
    with pytest.raises(CorpusError, match=f"give exactly one text source: .*; got {got}$"):
        TextSource(**kwargs)


def test_unknown_corpus_names_the_parameter():
    with pytest.raises(ArgumentError, match="corpus must be one of austen, austen:sensesensibility, .*, "
                       "austen:persuasion, got 'bronte'") as info:
        TextSource(corpus="bronte")
    assert info.value.as_flag().startswith("--corpus ")


def test_source_names_show_file_names_only(tmp_path):
    assert TextSource(files=[str(tmp_path / "books" / "emma.txt"), "-"]).name == "emma.txt, stdin"
    many = TextSource(files=[f"/data/{i}.txt" for i in range(5)])
    assert many.name == "0.txt, 1.txt and 3 more files"
    assert TextSource(corpus="austen").name == "Austen's novels"
    assert TextSource(corpus="austen:persuasion").name == "Austen's persuasion"
    assert TextSource(dataset="emozilla/pg19").name == "emozilla/pg19"


def test_read_files_and_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    stdin = SimpleNamespace(read=lambda: "second")
    assert TextSource(files=[tmp_path / "a.txt", "-"]).read(stdin=stdin) == "first\n\nsecond"


def test_read_corpus_uses_the_cache(fake_cache, monkeypatch):
    cache_dir, texts = fake_cache
    monkeypatch.setenv("STREAMINGLLM_CACHE", str(cache_dir))
    monkeypatch.setattr(corpus, "_download_deb", _no_download)
    assert TextSource(corpus="austen").read() == "\n\n".join(texts[n] for n in AUSTEN_NOVELS)
    assert TextSource(corpus="austen:emma").read() == texts["emma"]  # one novel, the one pretrain may hold out


class Words:
    """One token per character (ids = code points); a BOS of 0 when asked for, if ``bos``."""

    def __init__(self, bos: bool):
        self.bos_token_id = 0 if bos else None
        self.calls = []

    def __call__(self, text, add_special_tokens=True, verbose=True):
        self.calls.append(len(text))
        return SimpleNamespace(input_ids=([0] if add_special_tokens and self.bos_token_id == 0 else []) + [ord(c) for c in text])


def test_tokenize_window_offset_and_bos():
    text = "abcdefghij" * 10
    assert tokenize_window(Words(bos=False), text, 3, 4) == [ord(c) for c in "defg"]
    assert tokenize_window(Words(bos=True), text, 3, 4) == [0] + [ord(c) for c in "def"]  # BOS counts
    assert tokenize_window(Words(bos=True), text) == [0] + [ord(c) for c in text]
    tok = Words(bos=False)
    tokenize_window(tok, "x" * 100_000, 0, 10)
    assert tok.calls[0] < 1000  # only as much text as the window needs is tokenized


def test_tokenize_window_short_text():
    with pytest.warns(UserWarning, match="the text has only 5 tokens after offset 5 \\(asked for 100\\)"):
        assert len(tokenize_window(Words(bos=False), "abcdefghij", 5, 100)) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_window(Words(bos=False), "abcdefghij", 5, 5)
    with pytest.raises(ArgumentError, match="offset leaves 1 token\\(s\\) of the text: need at least 2, got 9"):
        tokenize_window(Words(bos=False), "abcdefghij", 9)
    with pytest.raises(ValueError, match="the text gives 1 token\\(s\\)"):
        tokenize_window(Words(bos=False), "a")


@pytest.mark.parametrize("kwargs, message", [(dict(offset=-1), "offset must be an integer >= 0, got -1"),
                                             (dict(num_tokens=1), "num_tokens must be an integer >= 2, got 1")])
def test_tokenize_window_bad_arguments(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        tokenize_window(Words(bos=False), "abc", **kwargs)


def test_missing_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: its import fails
    with pytest.raises(ImportError, match=r"'emozilla/pg19' need the optional package 'datasets': pip install 'streamingllm\[hub\]'"):
        TextSource(dataset="emozilla/pg19").read(100)
