"""The serving engine: one worker thread owns the model and advances every running request.

Each loop iteration (fair to every client):

1. admits waiting requests, up to ``max_batch`` running at once (the rest wait in a bounded
   queue; past it, requests are refused with 503 and ``Retry-After``);
2. feeds one prompt chunk (``chunk_size`` tokens) of one request that is still reading its
   prompt, taking such requests in turn, so a long prompt delays the others by one chunk's time;
3. chooses the next token of every request that is generating, and feeds all of those tokens in
   one batched forward (:func:`streamingllm.feed.decode_rows`): each row attends to its own
   session's cache at its own positions, so sessions of any length and fill share the step.

A request whose client goes away is cancelled at the next iteration: a reply stops there and its
turn is closed with what was generated (as Ctrl-C in the chat does); a prompt cut part-way
leaves a cache that no longer matches the transcript, so the session starts over next time.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..cache import SinkCache
from ..compiled import DecodeStep
from ..feed import Sampling, decode_rows, iter_chunks, token_logprobs
from ..session import Session, StopStrings, TextDecoder, Turn, stop_token_ids
from .sessions import Entry, SessionStore


class OverloadedError(RuntimeError):
    """The queue of waiting requests is full (503)."""


class RequestError(Exception):
    """A request the engine refuses (an HTTP status and a message)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param


@dataclass
class Job:
    """One request: what to feed and how to generate, and where its events go.

    Attributes:
        messages: the conversation (chat), or None for a text completion.
        prompt: the text to continue (text completion), or None.
        entry: the session (chat with a session id), or None for a one-off request.
        sampling, max_tokens, min_tokens, stop, top_logprobs: how to generate (``top_logprobs``:
            None for no log-probabilities, else how many alternatives per token).
        emit: ``emit(event: dict)``, called from the worker thread for each event:
            ``{"type": "token", "text", "logprob"?}``, then ``{"type": "done", ...}`` or
            ``{"type": "error", "status", "message"}``.
    """

    messages: list[dict] | None
    prompt: str | None
    entry: Entry | None
    sampling: Sampling
    max_tokens: int
    min_tokens: int
    stop: tuple[str, ...]
    top_logprobs: int | None
    emit: Callable[[dict], None]
    created: float = field(default_factory=time.perf_counter)
    watched_at: float = 0.0  # when the HTTP side last checked that the client is still connected
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker state
    session: Session | None = None
    cache: SinkCache | None = None
    turn: Turn | None = None
    restored: bool = False
    chunks: object = None
    prompt_tokens: int = 0
    logits: torch.Tensor | None = None
    generator: torch.Generator | None = None
    recent: torch.Tensor | None = None
    reply_ids: list[int] = field(default_factory=list)
    fed: int = 0  # reply tokens in the cache (a token is fed by the step that computes the next one)
    decoder: TextDecoder | None = None
    shown: StopStrings | None = None
    last_token_at: float | None = None


class Engine:
    """The model, its sessions and the worker thread that serves them.

    Args:
        model, tokenizer: the loaded model.
        sink_size, window_size: each session's cache (tokens).
        store: the sessions.
        chunk_size: prompt tokens per forward (>= 1).
        max_batch: requests generating at once, batched into one forward per step (>= 1).
        max_queue: requests waiting beyond those (>= 0); more are refused (503).
        max_prompt_tokens: tokens one request may feed at most (413 beyond).
        max_tokens: the reply limit when a request gives none.
        penalty_last_n: tokens the repetition/presence/frequency penalties look at.
        metrics: optional :class:`~streamingllm.serve.metrics.Metrics` to record into.
        compile: a lone request's decode steps compiled (``"auto"``: on CUDA); the warm-up is said
            on stderr (:class:`~streamingllm.compiled.DecodeStep`).
    """

    def __init__(self, model, tokenizer, sink_size: int, window_size: int, store: SessionStore, *,
                 chunk_size: int = 256, max_batch: int = 8, max_queue: int = 64, max_prompt_tokens: int = 65536,
                 max_tokens: int = 512, penalty_last_n: int = 64, metrics=None, compile: str | bool = "auto"):
        self.model, self.tokenizer, self.store, self.metrics = model, tokenizer, store, metrics
        self.decode = DecodeStep(model, compile, on_compile=lambda line: print(line, file=sys.stderr, flush=True))
        self.sink_size, self.window_size = sink_size, window_size
        self.chunk_size, self.max_batch, self.max_queue = chunk_size, max_batch, max_queue
        self.max_prompt_tokens, self.max_tokens, self.penalty_last_n = max_prompt_tokens, max_tokens, penalty_last_n
        self.stop_ids = stop_token_ids(tokenizer)
        self._stop_tensor = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=model.device)
        self._waiting: queue.Queue[Job] = queue.Queue()
        self._running: list[Job] = []
        self._turn = 0  # round-robin over prompts being read
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamingllm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._waiting.put(None)
        self._thread.join(timeout=30)

    @property
    def load(self) -> dict:
        return {"running": len(self._running), "waiting": self._waiting.qsize()}

    def submit(self, job: Job) -> None:
        """Queue ``job`` (any thread); OverloadedError when the queue is full."""
        if self._waiting.qsize() + len(self._running) >= self.max_batch + self.max_queue:
            raise OverloadedError("the server is at capacity")
        self._waiting.put(job)

    def new_session(self, system: str | None, pin_system: bool) -> Session:
        """An empty conversation with this server's cache sizes."""
        return Session(self.model, self.tokenizer, self.sink_size, self.window_size, system=system,
                       chunk_size=self.chunk_size, pin_system=pin_system and system is not None)

    # --- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self._admit()
            if not self._running:
                continue
            try:
                for job in [j for j in self._running if j.cancelled.is_set()]:
                    self._end(job, "cancelled")
                self._read_prompt_chunk()
                self._decode_step()
            except Exception as err:  # a bug: fail what is running, keep serving
                traceback.print_exc()
                for job in list(self._running):
                    self._fail(job, 500, _internal(err), "server_error")

    def _admit(self) -> None:
        block = not self._running
        while len(self._running) < self.max_batch:
            try:
                job = self._waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if job is None:
                return
            block = False
            if job.cancelled.is_set():
                self._release(job)
                continue
            try:
                self._begin(job)
            except RequestError as err:
                self._fail(job, err.status, str(err), err.type, err.param)
                continue
            except ValueError as err:
                self._fail(job, 400, str(err), param="messages")
                continue
            except Exception as err:
                traceback.print_exc()
                self._fail(job, 500, _internal(err), "server_error")
                continue
            self._running.append(job)

    def _begin(self, job: Job) -> None:
        """Plan the job's prompt (nothing is fed yet)."""
        if job.messages is not None:
            system = job.messages[0]["content"] if job.messages[0]["role"] == "system" else None
            if job.entry is not None:
                job.session, job.restored = self.store.session(job.entry, system)
            else:
                job.session = self.new_session(system, False)
            job.turn = job.session.prepare(job.messages)  # changes nothing: the request may still be refused
            ids = job.turn.prompt_ids
            job.cache = job.session.cache
        else:
            ids = self.tokenizer(job.prompt, return_tensors="pt").input_ids[0]
            job.cache = SinkCache(self.model, self.sink_size, self.window_size)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(413, f"the prompt adds {len(ids)} tokens; this server takes at most "
                                    f"{self.max_prompt_tokens} per request (--max-prompt-tokens)", param="messages")
        if job.entry is not None:
            self.store.adopt(job.entry, job.session)
            self.store.enforce_budget()
        if job.turn is not None:
            job.session.start(job.turn)
        job.prompt_tokens = len(ids)
        job.chunks = iter_chunks(self.model, job.cache, ids[None], chunk_size=self.chunk_size)
        job.decoder, job.shown = TextDecoder(self.tokenizer), StopStrings(job.stop)
        if job.sampling.seed is not None:
            job.generator = torch.Generator(device=self.model.device).manual_seed(job.sampling.seed)
        if job.sampling.penalizes:
            job.recent = ids[-job.sampling.penalty_last_n :][None].to(self.model.device)

    def _read_prompt_chunk(self) -> None:
        reading = [j for j in self._running if j.chunks is not None]
        if not reading:
            return
        self._turn = (self._turn + 1) % len(reading)
        job = reading[self._turn]
        try:
            _, logits = next(job.chunks)
        except StopIteration:
            job.chunks = None
        except Exception as err:  # this request's forward failed (out of memory, say): fail it alone
            traceback.print_exc()
            self._fail(job, 500, _internal(err), "server_error")
        else:
            job.logits = logits[:, -1]
            if self._prompt_done(job):
                job.chunks = None

    def _prompt_done(self, job: Job) -> bool:
        fed = job.cache.seen_tokens - (job.turn.cached_tokens if job.turn is not None else 0)
        return fed >= job.prompt_tokens

    def _decode_step(self) -> None:
        generating = [j for j in self._running if j.chunks is None and j.logits is not None]
        if not generating:
            return
        tokens, going = [], []
        for job in generating:
            try:
                token = self._choose(job)
            except Exception as err:  # this request's sampling failed: fail it alone
                traceback.print_exc()
                self._fail(job, 500, _internal(err), "server_error")
                continue
            if token is not None:
                tokens.append(token)
                going.append(job)
        if not going:
            return
        try:
            logits = decode_rows(self.model, [j.cache for j in going], tokens, self.decode)
        except Exception as err:  # the rows' caches may be written in part: fail the rows of this step
            traceback.print_exc()
            for job in going:
                self._fail(job, 500, _internal(err), "server_error")
            return
        for r, job in enumerate(going):
            job.logits = logits[r : r + 1]
            job.fed = len(job.reply_ids)

    def _choose(self, job: Job) -> int | None:
        """Pick and emit the job's next token; None when the job has ended."""
        logits = job.logits
        if job.recent is not None:
            logits = job.sampling.penalize(logits, job.recent)
        if len(job.reply_ids) < job.min_tokens and len(self._stop_tensor):
            logits = logits.index_fill(-1, self._stop_tensor, float("-inf"))
        tid = int(job.sampling.pick(logits, job.generator)[0])
        if tid in self.stop_ids:
            self._end(job, "stop", stopped=True)
            return None
        if job.recent is not None:
            job.recent = torch.cat((job.recent, torch.tensor([[tid]], device=job.recent.device)), 1)[
                :, -job.sampling.penalty_last_n :]
        job.reply_ids.append(tid)
        event = {"type": "token", "text": job.shown.add(job.decoder.add(tid))}
        if job.top_logprobs is not None:
            lp, top = token_logprobs(job.logits[0], tid, job.top_logprobs)
            event["logprob"] = self._logprob_entry(tid, lp, top)
        now = time.perf_counter()
        if self.metrics is not None:
            if job.last_token_at is None:
                self.metrics.first_token(now - job.created)
            else:
                self.metrics.token_gap(now - job.last_token_at)
        job.last_token_at = now
        job.emit(event)
        if job.shown.stopped:
            self._end(job, "stop")
            return None
        if len(job.reply_ids) >= job.max_tokens:
            self._end(job, "length")
            return None
        return tid

    def _logprob_entry(self, tid: int, lp: float, top: list[tuple[int, float]]) -> dict:
        piece = lambda t: self.tokenizer.decode([t])  # noqa: E731
        return {"token": piece(tid), "logprob": lp, "bytes": list(piece(tid).encode()),
                "top_logprobs": [{"token": piece(t), "logprob": v, "bytes": list(piece(t).encode())} for t, v in top]}

    def _end(self, job: Job, reason: str, stopped: bool = False) -> None:
        """Finish a job: close the session's turn, save it (before the end is acknowledged), emit the end.

        ``stopped``: the reply ended at an end-of-turn token."""
        if job in self._running:
            self._running.remove(job)
        session_info = None
        try:
            rest = job.shown.flush() if job.shown is not None and reason != "cancelled" else ""
            if rest:
                job.emit({"type": "token", "text": rest})
            if job.turn is not None:
                if job.chunks is not None:  # cut while reading the prompt: the cache no longer matches
                    if job.entry is not None:
                        self.store.forget_state(job.entry)
                else:
                    shown = job.shown.text[: job.shown.shown]
                    job.session.finish(job.reply_ids, shown, stopped or job.fed == len(job.reply_ids))
                    if job.entry is not None:
                        self.store.save(job.entry)
                session_info = self._session_info(job)
        except Exception as err:  # closing or saving the turn failed: the turn is not acknowledged
            traceback.print_exc()
            self._fail(job, 500, _internal(err), "server_error")
            return
        cached = job.turn.cached_tokens if job.turn else 0
        if self.metrics is not None:
            self.metrics.finished(job.prompt_tokens, cached, len(job.reply_ids), reason,
                                  time.perf_counter() - job.created)
        self._release(job)
        usage = {"prompt_tokens": job.prompt_tokens + cached, "completion_tokens": len(job.reply_ids),
                 "total_tokens": job.prompt_tokens + cached + len(job.reply_ids),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        job.emit({"type": "done", "finish_reason": reason, "usage": usage, "session": session_info})

    def _session_info(self, job: Job) -> dict | None:
        if job.entry is None:
            return None
        cache = job.session.cache
        status = "restored" if job.restored and job.turn.status == "continued" else job.turn.status
        info = {"id": job.entry.id, "status": status, "evicted": job.entry.evicted, "seen_tokens": cache.seen_tokens,
                "cached_tokens": cache.cached_tokens, "max_cached_tokens": cache.max_cached_tokens,
                "pinned_tokens": job.session.pinned_tokens}
        job.entry.evicted = None
        return info

    def _fail(self, job: Job, status: int, message: str, type_: str = "invalid_request_error",
              param: str | None = None) -> None:
        if job in self._running:
            self._running.remove(job)
        if job.entry is not None and job.turn is not None and status >= 500 and job.session is job.entry.session:
            self.store.forget_state(job.entry)  # its cache may be written in part
        self._release(job)
        job.emit({"type": "error", "status": status, "message": message, "error_type": type_, "param": param})

    def _release(self, job: Job) -> None:
        if job.entry is not None:
            self.store.release(job.entry)


def _internal(err: Exception) -> str:
    return f"internal error: {type(err).__name__}: {err}"


def emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[dict], None]:
    """An ``emit`` that hands events from the worker thread to an asyncio queue."""
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
