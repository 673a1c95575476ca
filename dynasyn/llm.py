"""Chat calls to any OpenAI-compatible endpoint (OpenAI, Ollama, LM Studio, vLLM), with a reply cache.

The API key never travels through a node input: it comes from ``DYNASYN_API_KEY`` (or
``OPENAI_API_KEY``) or from a key file, and it is sent only to the hosts the operator named
(``DYNASYN_API_HOSTS`` / ``DYNASYN_API_BASE``; by default only api.openai.com), over https. Any
other endpoint a workflow names (a local Ollama / LM Studio included) gets no key at all. The
operator may also restrict which hosts may be called at all (``DYNASYN_ENDPOINT_HOSTS``); cloud
metadata / link-local addresses are always refused, names checked again when connecting (dynasyn.egress:
no redirects, capped replies, an overall deadline). Reply bodies never reach node errors (they are
stored in /history for every client): they are logged at debug level. Replies are cached on disk
keyed by endpoint, model, request and seed, so a re-run neither calls nor bills again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from .egress import forbidden_address, guarded_client, refusal
from .errors import DynASynError

KEY_ENV_VARS = ("DYNASYN_API_KEY", "OPENAI_API_KEY")
DEFAULT_KEY_FILE = Path.home() / ".config" / "dynasyn" / "api_key"
KEY_HOSTS_ENV = "DYNASYN_API_HOSTS"          # hosts (or host:port, or URLs) that may receive the key
API_BASE_ENV = "DYNASYN_API_BASE"            # the operator's endpoint: its host may receive the key too
ENDPOINT_HOSTS_ENV = "DYNASYN_ENDPOINT_HOSTS"  # when set: the only hosts any endpoint may name
DEFAULT_KEY_HOSTS = ("api.openai.com",)

log = logging.getLogger("DynASyn")


class LLMError(DynASynError):
    """The endpoint could not give a usable reply; the message says what to do."""


class LLMCancelled(LLMError):
    """``should_stop`` asked to stop while waiting for the endpoint (e.g. ComfyUI's Cancel)."""


RETRIES = 3            # extra attempts after a 429 / 5xx reply
RETRY_BASE_S = 1.0     # backoff: 1, 2, 4 ... seconds (or the server's Retry-After), capped
RETRY_MAX_S = 20.0


def _shown(path: Path) -> str:
    """``path`` for a message anyone may read (the route answers it, /history keeps node errors): the home folder
    as ``~``, so the server's user name and layout stay private."""
    try:
        return "~/" + Path(path).expanduser().relative_to(Path.home()).as_posix()
    except ValueError:
        return Path(path).name


def _host_port(url: str) -> tuple[str, int | None]:
    p = urlparse(url if "//" in url else f"//{url}")
    try:
        port = p.port
    except ValueError:
        port = None
    return (p.hostname or "").lower().rstrip("."), port


def _host_list(*env_vars: str, default: tuple = ()) -> list[tuple[str, int | None]] | None:
    """``[(host, port or None)]`` from comma-separated env vars; None when none of them is set."""
    found, any_set = [], False
    for var in env_vars:
        raw = os.environ.get(var, "").strip()
        if raw:
            any_set = True
            found += [_host_port(item.strip()) for item in raw.split(",") if item.strip()]
    if not any_set:
        return None if not default else [(h, None) for h in default]
    return [hp for hp in found if hp[0]]


def _listed(url: str, hosts) -> bool:
    host, port = _host_port(url)
    port = port or (443 if url.lower().startswith("https") else 80)
    return any(h == host and (p is None or p == port) for h, p in hosts)


def key_hosts() -> list[tuple[str, int | None]]:
    """The hosts the operator lets the key go to: ``DYNASYN_API_HOSTS`` (default api.openai.com) + ``DYNASYN_API_BASE``."""
    hosts = _host_list(KEY_HOSTS_ENV, default=DEFAULT_KEY_HOSTS)
    base = os.environ.get(API_BASE_ENV, "").strip()
    return hosts + ([_host_port(base)] if base else [])


def _literal_ip(host: str):
    """The address a literal host means to the resolver (``2852039166``, ``0xa9.254.169.254`` and
    ``::ffff:169.254.169.254`` included), or None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.inet_aton(host)) if host and host[-1].isalnum() else None
        except OSError:
            return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    ip = _literal_ip(host)
    return bool(ip and ip.is_loopback)


def validate_base_url(base_url: str) -> str:
    """The endpoint URL, refused when it could carry secrets, steer the request or reach a forbidden host."""
    url = (base_url or "").strip()
    p = urlparse(url)
    if p.scheme not in ("http", "https") or not p.hostname or any(c.isspace() or ord(c) < 32 for c in url):
        raise LLMError("The endpoint is not an http(s) URL such as http://127.0.0.1:11434/v1 (Ollama) or "
                       "https://api.openai.com/v1.")
    if p.username or p.password or "@" in p.netloc:
        raise LLMError("Do not put credentials in the endpoint URL (it is saved with the workflow); "
                       f"set {KEY_ENV_VARS[0]} or write the key to {_shown(DEFAULT_KEY_FILE)} instead.")
    if "?" in url or "#" in url or p.params:
        raise LLMError("The endpoint URL may not have a query string ('?...'), a fragment ('#...') or ';' parameters: "
                       "give the base URL only, e.g. https://api.openai.com/v1.")
    host = p.hostname.lower()
    ip = _literal_ip(host)
    if ip is not None and forbidden_address(ip):  # names are checked again when connecting (dynasyn.egress)
        raise LLMError(f"The endpoint host {host} is a link-local / metadata / reserved address; it is never called.")
    allowed = _host_list(ENDPOINT_HOSTS_ENV)
    if allowed is not None and not _listed(url, allowed + key_hosts()):
        raise LLMError(f"The endpoint host {host} is not one the operator allowed ({ENDPOINT_HOSTS_ENV}); "
                       "pick an allowed endpoint or ask the operator to add it.")
    return url.rstrip("/")


def resolve_api_key(base_url: str, key_file: str | os.PathLike | None = None) -> str | None:
    """The key for ``base_url``, or None (send no key) when the operator did not name its host.

    The key (environment, then ``key_file`` or the default file) goes only to a host listed in
    ``DYNASYN_API_HOSTS`` (default api.openai.com) or named by ``DYNASYN_API_BASE``, and only over
    https (or to a listed loopback host). Every other endpoint, loopback included, gets no key: a
    workflow cannot send the operator's key to a host of its choosing.
    """
    url = validate_base_url(base_url)
    if not _listed(url, key_hosts()):
        return None
    if not url.lower().startswith("https://") and not _is_loopback(_host_port(url)[0]):
        raise LLMError(f"The API key is only sent over https; use https:// for {_host_port(url)[0]}.")
    for var in KEY_ENV_VARS:
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    path = Path(key_file).expanduser() if key_file else DEFAULT_KEY_FILE
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip()
        if key:
            return key
    raise LLMError(f"No API key for {url}: set the environment variable {KEY_ENV_VARS[0]} before starting ComfyUI, "
                   f"or write the key to {_shown(path)} (never into a node, where it would be saved with the workflow).")


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


def _body(e: Exception) -> str:
    """The reply an API error came with, for the debug log only."""
    try:
        return f"{e} {e.response.text}"  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no response (connection errors) or an unreadable one
        return str(e)


def request_key(base_url: str, model: str, seed: int, cache_key: dict) -> str:
    """The reply cache's key of a request (``base_url`` as ``validate_base_url`` returns it)."""
    return ReplyCache.key(endpoint=base_url, model=model, seed=seed, **cache_key)


def _client(base_url: str, api_key: str | None, timeout: float, deadline: float | None = None):
    """An openai client; without ``api_key`` its requests carry no Authorization header at all. Its HTTP client
    (``dynasyn.egress``) checks the address it connects to, follows no redirect, caps the reply and ends by
    ``deadline`` (default ``timeout`` from now)."""
    import openai

    http = guarded_client(time.monotonic() + timeout if deadline is None else deadline)
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "no-key", timeout=timeout, max_retries=0,
                           http_client=http)
    return client, ({} if api_key else {"extra_headers": {"Authorization": openai.Omit()}})


MAX_LISTED_MODELS = 50


def list_models(base_url: str, api_key: str | None, timeout: float = 10.0) -> list[str] | None:
    """The model names the endpoint offers (``GET <base>/models``, sorted), or None when it offers no list
    (no such route, an error, or a reply that is not a model list). The key rules are ``chat``'s."""
    import openai

    base_url = validate_base_url(base_url)
    client, extra = _client(base_url, api_key, timeout)
    try:
        page = client.models.list(timeout=timeout, **extra)
        names = sorted({str(m.id) for m in page.data if getattr(m, "id", None)})
    except (openai.APIError, AttributeError, TypeError, ValueError, RecursionError, DynASynError) as e:
        if (refused := refusal(e)) is not None:
            raise LLMError(str(refused)) from None
        log.debug("[DynASyn] %s offers no model list: %.500s", base_url, _body(e))
        return None
    finally:
        client.close()
    return names or None


MAX_OFFERED_MODELS = 500
MAX_MODEL_NAME = 200


def offered_models(base_url: str, timeout: float = 10.0) -> list[str] | None:
    """The model names ``base_url`` offers, for a model picker in the page (anyone reaching ComfyUI's port may ask,
    with any URL): the URL is checked as for ``chat`` (refused: ``LLMError``), the key goes only to a host the
    operator named, and what comes back is only names (at most ``MAX_OFFERED_MODELS``, each cut to
    ``MAX_MODEL_NAME`` characters), never the reply itself. None when the endpoint offers no list."""
    names = list_models(base_url, resolve_api_key(base_url), timeout)
    return [n[:MAX_MODEL_NAME] for n in names[:MAX_OFFERED_MODELS]] if names else None


def _unknown_model(base_url: str, model: str, api_key: str | None, timeout: float) -> str:
    names = list_models(base_url, api_key, min(10.0, timeout))
    if not names:
        return f"{base_url} does not know the model {model!r} (404); pull it or pick another."
    shown = ", ".join(names[:MAX_LISTED_MODELS]) + (f" (+{len(names) - MAX_LISTED_MODELS} more)"
                                                    if len(names) > MAX_LISTED_MODELS else "")
    return f"{base_url} does not know the model {model!r} (404). It offers: {shown}."


def chat(base_url: str, model: str, messages: list, *, seed: int, api_key: str | None, cache: ReplyCache | None = None,
         cache_key: dict | None = None, timeout: float = 60.0, max_tokens: int = 1024, json_mode: bool = False,
         parse=None, deadline: float | None = None, should_stop=None, unload: bool = False):
    """One chat completion: ``parse(reply text)`` (or the text). ``cache_key`` (what identifies the request) keys
    the cache; a reply is cached only once ``parse`` accepted it, so a bad reply is asked for again next time.

    The call, retries included, ends by ``deadline`` (a ``time.monotonic()`` value; default ``timeout`` seconds from
    now); ``should_stop()`` is checked before each attempt and while waiting to retry (raises ``LLMCancelled``).
    Without ``api_key`` (None or empty) the request carries no Authorization header at all. ``unload`` asks the
    server to unload the model once it answered (``keep_alive: 0``, read by Ollama-style servers; others ignore
    it), so it does not hold GPU memory through training. An unknown model's error lists the server's models."""
    import openai

    base_url = validate_base_url(base_url)
    key = request_key(base_url, model, seed, cache_key or {"messages": messages})
    parse = parse or (lambda text: text)
    if cache is not None and (hit := cache.get(key)) is not None:
        return parse(hit)
    deadline = time.monotonic() + timeout if deadline is None else deadline
    client, extra = _client(base_url, api_key, timeout, deadline)
    if json_mode:
        extra["response_format"] = {"type": "json_object"}
    if unload:
        extra["extra_body"] = {"keep_alive": 0}
    try:
        resp = _create(client, base_url, timeout, deadline, should_stop,
                       model=model, messages=messages, seed=seed, temperature=0.7, max_tokens=max_tokens, **extra)
    except (openai.APIConnectionError, DynASynError) as e:
        if (refused := refusal(e)) is not None:  # a forbidden address or an oversized reply: say which
            raise LLMError(str(refused)) from None
        if isinstance(e, DynASynError):
            raise
        if isinstance(e, openai.APITimeoutError):
            raise LLMError(f"{base_url} did not answer within {timeout:.0f} s; raise the timeout or use a smaller model.") from e
        raise LLMError(f"Cannot reach {base_url}: is the server running (Ollama: `ollama serve`) and the URL right? "
                       "Or switch the node to offline mode.") from e
    except openai.AuthenticationError as e:
        if not api_key:
            raise LLMError(f"{base_url} wants an API key (401), and none was sent: the key goes only to hosts the "
                           f"operator lists in {KEY_HOSTS_ENV} (default api.openai.com).") from None
        raise LLMError(f"{base_url} rejected the API key (401). Check {KEY_ENV_VARS[0]} or the key file.") from e
    except openai.NotFoundError:
        raise LLMError(_unknown_model(base_url, model, api_key, timeout)) from None
    except openai.APIStatusError as e:  # the body stays in the log (debug): node errors are shown to every client
        log.debug("[DynASyn] %s answered HTTP %s: %.2000s", base_url, e.status_code, _body(e))
        raise LLMError(f"{base_url} answered HTTP {e.status_code} (the reply is in ComfyUI's debug log).") from None
    except (openai.APIError, RecursionError) as e:  # e.g. a body that is not a chat completion
        log.debug("[DynASyn] %s sent an unusable reply: %.2000s", base_url, _body(e))
        raise LLMError(f"{base_url} sent a reply that is not a chat completion (details in ComfyUI's debug log).") from None
    finally:
        client.close()
    try:
        text = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        log.debug("[DynASyn] %s sent an unusable reply: %.2000s", base_url, resp)
        raise LLMError(f"{base_url} sent a reply that is not a chat completion (details in ComfyUI's debug log).") from None
    if not isinstance(text, str) or not text.strip():
        raise LLMError(f"{base_url} sent an empty reply for model {model!r}.")
    result = parse(text)
    if cache is not None:
        cache.put(key, text)
    return result
