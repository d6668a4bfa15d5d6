"""``streamingllm serve``: an OpenAI-compatible HTTP server with one sink cache per conversation.

* :mod:`.protocol`: the request, response and stream-chunk bodies (pydantic), in OpenAI's field
  order, with this server's extensions marked; requests translate themselves into engine requests.
* :mod:`.sessions`: the session store: ids, a least-recently-used budget of sessions and cache
  bytes, persistence in a state directory.
* :mod:`.jobs`: what the engine is asked (a frozen ``GenerationRequest`` inside a ``Job``) and the
  typed events it answers with (``TokenText``, then ``Finished`` or ``Failed``).
* :mod:`.engine`: one worker thread that owns the model; it prefills prompts chunk by chunk and
  batches the decode steps of every running request (:func:`streamingllm.feed.decode_rows`),
  choosing tokens and text as generation and sessions do (:mod:`streamingllm.sampling`,
  :mod:`streamingllm.text`).
* :mod:`.serving`: ``OpenAIServing``: a request becomes a job, its events OpenAI's responses,
  whole or as server-sent events.
* :mod:`.guard`: the checks before any route, as a pure ASGI middleware: the ``Host`` header, the
  API key, the body size as it streams in, security headers, and 500s that name an id.
* :mod:`.logs`: internal errors logged under an id; session ids redacted from every log.
* :mod:`.app`: the FastAPI application: error handlers, metrics, the chat page (with its
  Content-Security-Policy), and routes of a few lines that call ``OpenAIServing``.

It needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client). The core never imports it.
"""
