"""The serving engine: one worker thread owns the model and advances every running request.

Each loop iteration (fair to every client):

1. admits waiting requests, up to ``max_batch`` running at once (the rest wait in a bounded
   queue; past it, requests are refused with 503 and ``Retry-After``). A request's prompt was
   tokenized before, on the intake thread (with its session loaded from the state directory if
   need be), so a long prompt never stalls the loop while it is tokenized;
2. feeds one prompt chunk (``chunk_size`` tokens) of one request that is still reading its
   prompt, taking such requests in turn, so a long prompt delays the others by one chunk's time;
3. chooses the next token of every request that is generating, and feeds all of those tokens in
   one batched forward (:func:`streamingllm.feed.decode_rows`): each row attends to its own
   session's cache at its own positions, so sessions of any length and fill share the step.

A request whose client goes away is cancelled at the next iteration: a reply stops there and its
turn is closed with what was generated (as Ctrl-C in the chat does); a prompt cut part-way
leaves a cache that no longer matches the transcript, so the session starts over next time.

A :class:`~.jobs.Job` carries what the client asked (a frozen :class:`~.jobs.GenerationRequest`);
the worker keeps its own :class:`JobState` beside it, whose :class:`~streamingllm.sampling.TokenChooser`
and :class:`~streamingllm.text.ReplyText` are the ones :func:`~streamingllm.feed.generate_tokens` and
:class:`~streamingllm.session.Session` use: a request chooses the tokens they would, seed for seed.
The job's events are the dataclasses of :mod:`.jobs` (:class:`~.jobs.TokenText`, then
:class:`~.jobs.Finished` or :class:`~.jobs.Failed`).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..cache import BlockMemory, MemoryCache, SinkCache
from ..compiled import DecodeStep
from ..feed import decode_rows, iter_chunks, token_logprobs
from ..sampling import TokenChooser
from ..session import Session, Turn, stop_token_ids
from ..text import ReplyText
from .backends import StoreError
from .jobs import Event, Failed, Finished, Job, SessionReport, TokenLogprob, TokenText
from .logs import internal_error
from .sessions import SessionStore


class OverloadedError(RuntimeError):
    """The queue of waiting requests is full (503)."""


class RequestError(Exception):
    """A request the engine refuses (an HTTP status and a message)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param = status, type_, param


@dataclass
class JobState:
    """The engine's state for one job: the intake thread plans it (session, turn, prompt ids), then
    only the worker thread touches it.

    Attributes:
        job: the job.
        session: the conversation it continues (chat), or None (text completion).
        turn: the turn :meth:`Session.prepare` planned (chat), or None.
        restored: the session was loaded from the state directory for this job.
        cache: the cache its prompt and reply go into (the session's, or one of its own).
        ids: the prompt's token ids (1-D), as the intake thread tokenized them.
        prompt_tokens: prompt tokens it feeds (cached ones not counted).
        chunks: the prompt's chunks still to feed (:func:`~streamingllm.feed.iter_chunks`);
            None once the prompt is read.
        logits: the next-token logits (1, vocab), once the prompt is read.
        choose: chooses its tokens (its random generator and recent-token memory).
        reply: its reply's token ids and shown text.
        fed: reply tokens in the cache (a token is fed by the step that computes the next one).
        last_token_at: when its last token was emitted (``time.perf_counter()`` seconds).
    """

    job: Job
    session: Session | None = None
    turn: Turn | None = None
    restored: bool = False
    cache: SinkCache | None = None
    ids: torch.Tensor | None = None
    prompt_tokens: int = 0
    chunks: Iterator | None = None
    logits: torch.Tensor | None = None
    choose: TokenChooser | None = None
    reply: ReplyText | None = None
    fed: int = 0
    last_token_at: float | None = None


class Engine:
    """The model, its sessions and the worker thread that serves them.

    Args:
        model, tokenizer: the loaded model.
        sink_size, window_size: each session's cache (tokens).
        store: the sessions.
        chunk_size: prompt tokens per forward (>= 1).
        max_batch: requests generating at once, batched into one forward per step (>= 1).
        max_queue: requests waiting beyond those (>= 0); more are refused (503). Every request
            the engine holds counts, from :meth:`submit` until its end is emitted.
        max_prompt_tokens: tokens one request may feed at most (413 beyond).
        max_tokens: the reply limit when a request gives none.
        penalty_last_n: tokens the repetition/presence/frequency penalties look at.
        metrics: optional :class:`~streamingllm.serve.metrics.Metrics` to record into.
        compile: a lone request's decode steps compiled (``"auto"``: on CUDA); the warm-up is said
            on stderr (:class:`~streamingllm.compiled.DecodeStep`).
        memory: every cache keeps a memory of evicted blocks (:class:`~streamingllm.cache.BlockMemory`);
            such streams are decoded one by one, not in a shared batched forward.
        evict: sessions evict ``"tokens"`` or whole ``"turns"`` (:class:`~streamingllm.session.Session`).
    """

    def __init__(self, model, tokenizer, sink_size: int, window_size: int, store: SessionStore, *,
                 chunk_size: int = 256, max_batch: int = 8, max_queue: int = 64, max_prompt_tokens: int = 65536,
                 max_tokens: int = 512, penalty_last_n: int = 64, metrics=None, compile: str | bool = "auto",
                 memory: BlockMemory | None = None, evict: str = "tokens"):
        self.model, self.tokenizer, self.store, self.metrics = model, tokenizer, store, metrics
        self.decode = DecodeStep(model, compile, on_compile=lambda line: print(line, file=sys.stderr, flush=True))
        self.sink_size, self.window_size = sink_size, window_size
        self.memory, self.evict = memory, evict
        self.chunk_size, self.max_batch, self.max_queue = chunk_size, max_batch, max_queue
        self.max_prompt_tokens, self.max_tokens, self.penalty_last_n = max_prompt_tokens, max_tokens, penalty_last_n
        self.stop_ids = stop_token_ids(tokenizer)
        self._intake: queue.Queue[Job | None] = queue.Queue()  # submitted, to be tokenized
        self._waiting: queue.Queue[JobState | None] = queue.Queue()  # tokenized, to be admitted
        self._running: list[JobState] = []
        self._held: set[int] = set()  # id() of every job submitted and not yet ended
        self._held_lock = threading.Lock()
        self._turn = 0  # round-robin over prompts being read
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamingllm-engine", daemon=True)
        self._intake_thread = threading.Thread(target=self._intake_loop, name="streamingllm-intake", daemon=True)

    def start(self) -> None:
        self._intake_thread.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop the threads, then close the session store (:meth:`SessionStore.close`): a shared
        store's leases are handed back now, not after they expire (a turn still being served
        after the wait loses its lease then: a shared store refuses its commit, unacknowledged)."""
        self._stopping.set()
        self._intake.put(None)
        self._waiting.put(None)
        self._intake_thread.join(timeout=30)
        self._thread.join(timeout=30)
        self.store.close()

    @property
    def load(self) -> dict:
        running = len(self._running)
        return {"running": running, "waiting": max(len(self._held) - running, 0)}

    def submit(self, job: Job) -> None:
        """Take ``job`` (any thread); OverloadedError when ``max_batch + max_queue`` are held already."""
        with self._held_lock:
            if len(self._held) >= self.max_batch + self.max_queue:
                raise OverloadedError("the server is at capacity")
            self._held.add(id(job))
        self._intake.put(job)

    def new_session(self, system: str | None, pin_system: bool) -> Session:
        """An empty conversation with this server's cache sizes."""
        return Session(self.model, self.tokenizer, self.sink_size, self.window_size, system=system,
                       chunk_size=self.chunk_size, pin_system=pin_system and system is not None, memory=self.memory,
                       evict=self.evict)

    # --- the intake thread ----------------------------------------------------------------

    def _intake_loop(self) -> None:
        torch.set_grad_enabled(False)
        while (job := self._intake.get()) is not None:
            if job.cancelled.is_set():
                self._release(job)
                continue
            run = JobState(job)
            try:
                self._plan(run)
            except Exception as err:
                self._fail(run, _refusal(err))
                continue
            self._waiting.put(run)

    def _plan(self, run: JobState) -> None:
        """Find the job's session and tokenize its prompt (nothing is fed, nothing changes)."""
        job, request = run.job, run.job.request
        if request.messages is not None:
            system = request.messages[0]["content"] if request.messages[0]["role"] == "system" else None
            if job.entry is not None:  # claimed by this job: no other thread touches it
                run.session, run.restored = self.store.session(job.entry, system)
            else:
                run.session = self.new_session(system, False)
            run.turn = run.session.prepare(request.messages, request.max_tokens)
            run.ids = run.turn.prompt_ids
        else:
            run.ids = self.tokenizer(request.prompt, return_tensors="pt").input_ids[0]
        if len(run.ids) > self.max_prompt_tokens:
            raise RequestError(413, f"the prompt adds {len(run.ids)} tokens; this server takes at most "
                                    f"{self.max_prompt_tokens} per request (--max-prompt-tokens)", "request_too_large",
                               param="messages")

    # --- the worker thread ----------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self._admit()
            if not self._running:
                continue
            try:
                for run in [r for r in self._running if r.job.cancelled.is_set()]:
                    self._end(run, "cancelled")
                self._read_prompt_chunk()
                self._decode_step()
            except Exception as err:  # a bug: fail what is running, keep serving
                failure = Failed(500, internal_error(err), "server_error")
                for run in list(self._running):
                    self._fail(run, failure)

    def _admit(self) -> None:
        block = not self._running
        while len(self._running) < self.max_batch:
            try:
                run = self._waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if run is None:
                return
            block = False
            if run.job.cancelled.is_set():
                self._release(run.job)
                continue
            try:
                self._begin(run)
            except Exception as err:
                self._fail(run, _refusal(err))
                continue
            self._running.append(run)

    def _begin(self, run: JobState) -> None:
        """Open the planned job's turn (:meth:`_plan`); its prompt is fed from the next iteration."""
        job, request, ids = run.job, run.job.request, run.ids
        if run.session is not None:
            run.cache = run.session.cache
        else:
            run.cache = (SinkCache(self.model, self.sink_size, self.window_size) if self.memory is None
                         else MemoryCache(self.model, self.sink_size, self.window_size, self.memory))
        if job.entry is not None:
            self.store.adopt(job.entry, run.session)
            self.store.enforce_budget()
        if run.turn is not None:
            run.session.start(run.turn)
        run.prompt_tokens = len(ids)
        run.chunks = iter_chunks(self.model, run.cache, ids[None], chunk_size=self.chunk_size)
        run.reply = ReplyText(self.tokenizer, request.stop)
        run.choose = TokenChooser(request.sampling, ids, self.model.device, self.stop_ids, request.min_tokens)

    def _read_prompt_chunk(self) -> None:
        reading = [r for r in self._running if r.chunks is not None]
        if not reading:
            return
        self._turn = (self._turn + 1) % len(reading)
        run = reading[self._turn]
        try:
            _, logits = next(run.chunks)
        except StopIteration:
            run.chunks = None
        except Exception as err:  # this request's forward failed (out of memory, say): fail it alone
            self._fail(run, Failed(500, internal_error(err), "server_error"))
        else:
            run.logits = logits[:, -1]
            if self._prompt_done(run):
                run.chunks = None

    def _prompt_done(self, run: JobState) -> bool:
        fed = run.cache.seen_tokens - (run.turn.cached_tokens if run.turn is not None else 0)
        return fed >= run.prompt_tokens

    def _decode_step(self) -> None:
        generating = [r for r in self._running if r.chunks is None and r.logits is not None]
        if not generating:
            return
        tokens, going = [], []
        for run in generating:
            try:
                token = self._choose(run)
            except Exception as err:  # this request's sampling failed: fail it alone
                self._fail(run, Failed(500, internal_error(err), "server_error"))
                continue
            if token is not None:
                tokens.append(token)
                going.append(run)
        if not going:
            return
        try:
            logits = decode_rows(self.model, [r.cache for r in going], tokens, self.decode)
        except Exception as err:  # the rows' caches may be written in part: fail the rows of this step
            failure = Failed(500, internal_error(err), "server_error")
            for run in going:
                self._fail(run, failure)
            return
        for r, run in enumerate(going):
            run.logits = logits[r : r + 1]
            run.fed = len(run.reply.token_ids)

    def _choose(self, run: JobState) -> int | None:
        """Choose and emit the job's next token; None when the job has ended."""
        request = run.job.request
        tid = int(run.choose(run.logits)[0])
        if tid in self.stop_ids:
            self._end(run, "stop", stopped=True)
            return None
        text = run.reply.add(tid)
        logprob = None
        if request.top_logprobs is not None:
            logprob = self._logprob(run.logits[0], tid, request.top_logprobs)
        now = time.perf_counter()
        if self.metrics is not None:
            if run.last_token_at is None:
                self.metrics.first_token(now - run.job.created)
            else:
                self.metrics.token_gap(now - run.last_token_at)
        run.last_token_at = now
        run.job.emit(TokenText(text, logprob))
        if run.reply.stopped:
            self._end(run, "stop")
            return None
        if len(run.reply.token_ids) >= request.max_tokens:
            self._end(run, "length")
            return None
        return tid

    def _logprob(self, logits: torch.Tensor, tid: int, top: int) -> TokenLogprob:
        """Token ``tid``'s log-probability under ``logits`` (vocab,), with the ``top`` most likely tokens'."""
        lp, best = token_logprobs(logits, tid, top)
        piece = lambda t: self.tokenizer.decode([t])  # noqa: E731
        return TokenLogprob(piece(tid), lp, tuple((piece(t), v) for t, v in best))

    def _end(self, run: JobState, reason: str, stopped: bool = False) -> None:
        """Finish a job: close the session's turn, save it (before the end is acknowledged), emit the end.

        ``stopped``: the reply ended at an end-of-turn token."""
        job = run.job
        if run in self._running:
            self._running.remove(run)
        session = None
        try:
            rest = run.reply.flush() if run.reply is not None and reason != "cancelled" else ""
            if rest:
                job.emit(TokenText(rest))
            if run.turn is not None:
                if run.chunks is not None:  # cut while reading the prompt: the cache no longer matches
                    if job.entry is not None:
                        self.store.forget_state(job.entry)
                else:
                    reply_ids = run.reply.token_ids
                    run.session.finish(reply_ids, run.reply.text, stopped or run.fed == len(reply_ids))
                    if job.entry is not None:
                        self.store.save(job.entry)
                session = self._session_report(run)
        except Exception as err:  # closing or saving the turn failed: the turn is not acknowledged
            self._fail(run, _refusal(err) if isinstance(err, StoreError) else Failed(500, internal_error(err),
                                                                                     "server_error"))
            return
        cached = run.turn.cached_tokens if run.turn else 0
        generated = len(run.reply.token_ids) if run.reply is not None else 0
        if self.metrics is not None:
            self.metrics.finished(run.prompt_tokens, cached, generated, reason, time.perf_counter() - job.created)
        self._release(job)
        job.emit(Finished(reason, run.prompt_tokens + cached, cached, generated, session))

    def _session_report(self, run: JobState) -> SessionReport | None:
        """The session's numbers for the response; the eviction is reported once."""
        entry = run.job.entry
        if entry is None:
            return None
        cache = run.session.cache
        status = "restored" if run.restored and run.turn.status == "continued" else run.turn.status
        report = SessionReport(entry.id, status, entry.evicted, cache.seen_tokens, cache.cached_tokens,
                               cache.max_cached_tokens, run.session.pinned_tokens)
        entry.evicted = None
        return report

    def _fail(self, run: JobState, failure: Failed) -> None:
        job = run.job
        if run in self._running:
            self._running.remove(run)
        if (job.entry is not None and run.turn is not None and failure.status >= 500
                and run.session is job.entry.session):
            self.store.forget_state(job.entry)  # its cache may be written in part
        self._release(job)
        job.emit(failure)

    def _release(self, job: Job) -> None:
        """The job has ended (its end is emitted next): free its session and its place in the bound."""
        if job.entry is not None:
            self.store.release(job.entry)
        with self._held_lock:
            self._held.discard(id(job))


def _refusal(err: Exception) -> Failed:
    """The failure a job gets when planning or admitting it raised ``err``."""
    if isinstance(err, RequestError):
        return Failed(err.status, str(err), err.type, err.param)
    if isinstance(err, StoreError):  # the session store cannot serve the session now: retry later
        return Failed(503, str(err), "overloaded_error", "session_id")
    if isinstance(err, ValueError):  # malformed messages, a pinned session's other system prompt
        return Failed(400, str(err), param="messages")
    return Failed(500, internal_error(err), "server_error")


def emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Event], None]:
    """An ``emit`` that hands events from the worker thread to an asyncio queue."""
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
