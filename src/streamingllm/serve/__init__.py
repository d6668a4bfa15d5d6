"""``streamingllm serve``: an OpenAI-compatible HTTP server with one sink cache per conversation.

* :mod:`.protocol`: the request and response bodies (pydantic), in OpenAI's field order, with
  this server's extensions marked.
* :mod:`.sessions`: the session store: ids, a least-recently-used budget of sessions and cache
  bytes, persistence in a state directory.
* :mod:`.engine`: one worker thread that owns the model; it prefills prompts chunk by chunk and
  batches the decode steps of every running request (:func:`streamingllm.feed.decode_rows`).
* :mod:`.app`: the FastAPI application: routes, server-sent events, errors, metrics, the chat page.

It needs the ``serve`` extra (FastAPI, uvicorn, prometheus_client). The core never imports it.
"""
