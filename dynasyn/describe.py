"""Step 1 of augmentation: a short description of each subject, from a VLM or offline.

Each subject is sent as its own crop (the masked pixels on grey), with the class noun as a hint;
the reply must be a noun phrase of fewer than 5 words ("small red panda toy"). Offline, the
class noun (or a phrase the user wrote) is the description.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import time
from typing import Sequence

import numpy as np
import torch

from .llm import LLMError, ReplyCache, chat, request_key, validate_base_url

DESCRIBE_PROMPT = ("The picture shows one subject on a grey background; it is a {noun}. Describe it in a noun phrase of "
                   "at most 4 words that names its most distinctive look (colour, material, kind) and ends with what it "
                   "is, e.g. 'fluffy red panda toy'. Reply with the phrase only.")
MAX_WORDS = 4
MAX_SIDE = 768  # crops are sent at most this large: VLMs tile or downscale bigger pictures anyway (and bill per tile)
_ARTICLES = ("a ", "an ", "the ")


def subject_crop(image: torch.Tensor, mask: torch.Tensor, pad: float = 0.1) -> np.ndarray:
    """The subject's box (plus ``pad``) with everything outside its mask set to grey; uint8 [h, w, 3]."""
    m = mask.float() > 0.5
    ys, xs = torch.nonzero(m, as_tuple=True)
    if len(ys) == 0:
        raise LLMError("A subject mask is empty: there is nothing to describe.")
    h, w = m.shape
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    py, px = int((y1 - y0) * pad), int((x1 - x0) * pad)
    y0, y1, x0, x1 = max(0, y0 - py), min(h, y1 + py), max(0, x0 - px), min(w, x1 + px)
    crop = torch.where(m[y0:y1, x0:x1, None], image[y0:y1, x0:x1].float(), torch.tensor(0.5))
    return (crop.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def fit_within(pixels: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``pixels`` scaled down (aspect kept) so that neither side exceeds ``max_side``; smaller ones unchanged."""
    from PIL import Image

    h, w = pixels.shape[:2]
    if max(h, w) <= max_side:
        return pixels
    scale = max_side / max(h, w)
    size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def png_data_url(pixels: np.ndarray) -> tuple[str, str]:
    """``data:image/png;base64,...`` and the sha256 of the PNG bytes (the cache key's image part)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode(), hashlib.sha256(data).hexdigest()


def clean_phrase(reply: str) -> str:
    """First line, no quotes, articles or final punctuation; refused when longer than ``MAX_WORDS`` words."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    text = re.sub(r"^(description|answer|phrase)\s*:\s*", "", lines[0] if lines else "", flags=re.I)
    text = text.strip().strip("\"'`*").strip().rstrip(".!").strip().lower()
    for art in _ARTICLES:
        if text.startswith(art):
            text = text[len(art):]
    text = re.sub(r"\s+", " ", text)
    if not text or not re.fullmatch(r"[\w\- ']+", text):
        raise LLMError(f"The VLM's reply {reply[:80]!r} is not a short noun phrase.")
    if len(text.split()) > MAX_WORDS:
        raise LLMError(f"The VLM's reply {reply[:80]!r} has more than {MAX_WORDS} words; ask a model that follows "
                       "instructions, or use offline mode.")
    return text


def describe_subjects(image: torch.Tensor, masks: Sequence[torch.Tensor], class_nouns: Sequence[str], *,
                      base_url: str | None = None, model: str = "", api_key: str = "", seed: int = 0,
                      cache_dir=None, phrases: Sequence[str] | None = None, timeout: float = 60.0,
                      should_stop=None, unload: bool = False) -> list[str]:
    """One description per subject. ``base_url`` None = offline: ``phrases`` (when given) or the class nouns.

    ``timeout`` bounds every subject's call together (retries included); ``should_stop()`` cancels between attempts.
    ``unload``: the last request actually sent (not answered from the cache) asks the server to unload the model."""
    if len(masks) != len(class_nouns):
        raise LLMError(f"{len(masks)} masks but {len(class_nouns)} class nouns: give one class noun per subject mask.")
    if base_url is None:
        given = [p.strip() for p in (phrases or [])]
        return [given[i] if i < len(given) and given[i] else n.strip() for i, n in enumerate(class_nouns)]
    cache = ReplyCache(cache_dir)
    deadline = time.monotonic() + timeout
    requests = []
    for mask, noun in zip(masks, class_nouns):
        url, digest = png_data_url(fit_within(subject_crop(image, mask)))
        prompt = DESCRIBE_PROMPT.format(noun=noun.strip())
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        requests.append((messages, {"kind": "describe", "image": digest, "prompt": prompt}))
    endpoint = validate_base_url(base_url)
    sent = [i for i, (_, key) in enumerate(requests) if cache.get(request_key(endpoint, model, seed, key)) is None]
    return [chat(base_url, model, messages, seed=seed, api_key=api_key, cache=cache, timeout=timeout, cache_key=key,
                 max_tokens=32, parse=clean_phrase, deadline=deadline, should_stop=should_stop,
                 unload=unload and bool(sent) and i == sent[-1])
            for i, (messages, key) in enumerate(requests)]
