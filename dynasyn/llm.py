"""Chat calls to any OpenAI-compatible endpoint (OpenAI, Ollama, LM Studio, vLLM), with a reply cache.

The API key never travels through a node input: it comes from ``DYNASYN_API_KEY`` (or
``OPENAI_API_KEY``) or from a key file, and a loopback endpoint (a local Ollama / LM Studio)
may have none. Replies are cached on disk keyed by endpoint, model, request and seed, so a
re-run neither calls nor bills again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from .errors import DynASynError

KEY_ENV_VARS = ("DYNASYN_API_KEY", "OPENAI_API_KEY")
DEFAULT_KEY_FILE = Path.home() / ".config" / "dynasyn" / "api_key"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LLMError(DynASynError):
    """The endpoint could not give a usable reply; the message says what to do."""


class LLMCancelled(LLMError):
    """``should_stop`` asked to stop while waiting for the endpoint (e.g. ComfyUI's Cancel)."""


RETRIES = 3            # extra attempts after a 429 / 5xx reply
RETRY_BASE_S = 1.0     # backoff: 1, 2, 4 ... seconds (or the server's Retry-After), capped
RETRY_MAX_S = 20.0


def validate_base_url(base_url: str) -> str:
    url = (base_url or "").strip()
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        raise LLMError(f"The endpoint {url!r} is not an http(s) URL such as http://127.0.0.1:11434/v1 (Ollama) or "
                       "https://api.openai.com/v1.")
    if p.username or p.password:
        raise LLMError("Do not put credentials in the endpoint URL (it is saved with the workflow); "
                       f"set {KEY_ENV_VARS[0]} or write the key to {DEFAULT_KEY_FILE} instead.")
    return url.rstrip("/")


def resolve_api_key(base_url: str, key_file: str | os.PathLike | None = None) -> str:
    """The key from the environment, then ``key_file`` (or the default one); loopback endpoints may go without."""
    for var in KEY_ENV_VARS:
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    path = Path(key_file).expanduser() if key_file else DEFAULT_KEY_FILE
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    if urlparse(base_url).hostname in LOOPBACK:
        return "local"  # Ollama / LM Studio ignore the key but the client needs one
    raise LLMError(f"No API key for {base_url}: set the environment variable {KEY_ENV_VARS[0]} before starting ComfyUI, "
                   f"or write the key to {path} (never into a node, where it would be saved with the workflow).")


class ReplyCache:
    """One JSON file per request under ``folder``; writes are atomic."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None

    @staticmethod
    def key(**request) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        if self.folder is None:
            return None
        f = self.folder / f"{key}.json"
        try:
            return json.loads(f.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError):
            return None

    def put(self, key: str, reply: str) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"reply": reply}, fh)
        os.replace(tmp, self.folder / f"{key}.json")


def _retry_after(error, attempt: int) -> float:
    """Seconds to wait before the next attempt: the server's Retry-After (seconds) when it sent one, else exponential."""
    try:
        value = float(error.response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        value = RETRY_BASE_S * 2 ** attempt
    return min(max(value, 0.0), RETRY_MAX_S)


def _create(client, base_url: str, timeout: float, deadline: float, should_stop, **request):
    """``chat.completions.create`` with the overall ``deadline`` (time.monotonic()), Cancel checked before every
    attempt and during the waits, and 429 / 5xx retried with backoff (at most ``RETRIES`` times, never past the
    deadline). The last error is raised as the openai exception it was."""
    import openai

    attempt = 0
    while True:
        if should_stop is not None and should_stop():
            raise LLMCancelled(f"Cancelled while waiting for {base_url}.")
        left = deadline - time.monotonic()
        if left <= 0:
            raise LLMError(f"{base_url} did not answer within {timeout:.0f} s; raise the timeout or use a smaller model.")
        try:
            return client.chat.completions.create(timeout=left, **request)
        except (openai.RateLimitError, openai.InternalServerError) as e:
            wait = _retry_after(e, attempt)
            if attempt >= RETRIES or time.monotonic() + wait >= deadline:
                raise
            attempt += 1
            end = time.monotonic() + wait
            while (now := time.monotonic()) < end:
                if should_stop is not None and should_stop():
                    raise LLMCancelled(f"Cancelled while waiting for {base_url} (it answered HTTP {e.status_code}).") from e
                time.sleep(min(0.1, end - now))


def chat(base_url: str, model: str, messages: list, *, seed: int, api_key: str, cache: ReplyCache | None = None,
         cache_key: dict | None = None, timeout: float = 60.0, max_tokens: int = 1024, json_mode: bool = False,
         parse=None, deadline: float | None = None, should_stop=None):
    """One chat completion: ``parse(reply text)`` (or the text). ``cache_key`` (what identifies the request) keys
    the cache; a reply is cached only once ``parse`` accepted it, so a bad reply is asked for again next time.

    The call, retries included, ends by ``deadline`` (a ``time.monotonic()`` value; default ``timeout`` seconds from
    now); ``should_stop()`` is checked before each attempt and while waiting to retry (raises ``LLMCancelled``)."""
    import openai

    base_url = validate_base_url(base_url)
    key = ReplyCache.key(endpoint=base_url, model=model, seed=seed, **(cache_key or {"messages": messages}))
    parse = parse or (lambda text: text)
    if cache is not None and (hit := cache.get(key)) is not None:
        return parse(hit)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
    extra = {"response_format": {"type": "json_object"}} if json_mode else {}
    try:
        resp = _create(client, base_url, timeout, time.monotonic() + timeout if deadline is None else deadline, should_stop,
                       model=model, messages=messages, seed=seed, temperature=0.7, max_tokens=max_tokens, **extra)
    except openai.AuthenticationError as e:
        raise LLMError(f"{base_url} rejected the API key (401). Check {KEY_ENV_VARS[0]} or the key file.") from e
    except openai.APITimeoutError as e:
        raise LLMError(f"{base_url} did not answer within {timeout:.0f} s; raise the timeout or use a smaller model.") from e
    except openai.APIConnectionError as e:
        raise LLMError(f"Cannot reach {base_url}: is the server running (Ollama: `ollama serve`) and the URL right? "
                       "Or switch the node to offline mode.") from e
    except openai.NotFoundError as e:
        raise LLMError(f"{base_url} does not know the model {model!r} (404); pull it or pick another.") from e
    except openai.APIStatusError as e:
        raise LLMError(f"{base_url} answered HTTP {e.status_code}: {str(e)[:300]}") from e
    except openai.APIError as e:  # e.g. a body that is not a chat completion
        raise LLMError(f"{base_url} sent a reply that is not a chat completion: {str(e)[:300]}") from e
    try:
        text = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as e:
        raise LLMError(f"{base_url} sent a reply that is not a chat completion ({str(resp)[:200]}).") from e
    if not isinstance(text, str) or not text.strip():
        raise LLMError(f"{base_url} sent an empty reply for model {model!r}.")
    result = parse(text)
    if cache is not None:
        cache.put(key, text)
    return result
