"""Step 2 of augmentation: K prompts of the subjects acting alone and interacting.

A prompt is a template whose subjects are markers ``[1]``, ``[2]``...; it renders with the VLM
descriptions (drafts), the class nouns (ĉ_a, for training) or the placeholder tokens (c_a).
The LLM writes templates as JSON; offline, a seeded generator combines a real vocabulary of
actions, poses, relations and places for the number of subjects.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Sequence

from .llm import LLMError, ReplyCache, chat

MARKER = re.compile(r"\[(\d+)\]")
MAX_PROMPT_WORDS = 40


@dataclass(frozen=True)
class PromptTemplate:
    text: str  # "[1] jumping into [2] on a beach"

    def render(self, names: Sequence[str]) -> str:
        return MARKER.sub(lambda m: names[int(m.group(1)) - 1], self.text)

    def before_markers(self, names: Sequence[str]) -> list[str]:
        """The rendered text before each marker, in marker order: where each subject's words begin, so a word
        that also names a prop earlier in the prompt is not taken for the subject."""
        return [PromptTemplate(self.text[:m.start()]).render(names) for m in MARKER.finditer(self.text)]

    @property
    def subjects(self) -> list[int]:
        """Subject indices (0-based) in the order they appear."""
        return [int(m.group(1)) - 1 for m in MARKER.finditer(self.text)]


def validate_template(text: str, num_subjects: int) -> PromptTemplate | None:
    """The template when it names every subject exactly once and nothing else; None otherwise."""
    text = re.sub(r"\s+", " ", str(text)).strip().strip("\"'").rstrip(".").strip()
    found = [int(m) for m in MARKER.findall(text)]
    if sorted(found) != list(range(1, num_subjects + 1)) or len(text.split()) > MAX_PROMPT_WORDS:
        return None
    return PromptTemplate(text)


def pair_prompt(text: str, num_subjects: int) -> PromptTemplate:
    """A training pair's prompt as its user wrote it: the subjects it shows as markers [1]..[N] (class-noun order),
    each at most once; any other text is kept. Clear errors for anything else."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    found = [int(m) for m in MARKER.findall(text)]
    if not found:
        raise LLMError(f"The prompt {text[:80]!r} has no subject marker: write each subject it shows as [1], [2] ... "
                       "(class-noun order), e.g. '[1] hugging [2] on a beach'.")
    wrong = sorted({m for m in found if not 1 <= m <= num_subjects})
    if wrong:
        raise LLMError(f"The prompt {text[:80]!r} names subject {', '.join(f'[{m}]' for m in wrong)}, but there "
                       f"{'is 1 subject' if num_subjects == 1 else f'are {num_subjects} subjects'} ([1] to [{num_subjects}]).")
    twice = sorted({m for m in found if found.count(m) > 1})
    if twice:
        raise LLMError(f"The prompt {text[:80]!r} names {', '.join(f'[{m}]' for m in twice)} more than once; "
                       "each subject appears once.")
    return PromptTemplate(text)


# ----------------------------------------------------------------------------- offline generator
SOLO = ["jumping", "running", "sitting", "sleeping", "dancing", "swimming", "climbing a tree", "riding a bicycle",
        "reading a book", "eating a sandwich", "playing guitar", "flying a kite", "wearing a tiny hat", "waving",
        "rolling on the grass", "standing on one leg", "looking up at the sky", "skiing down a slope",
        "splashing in a puddle", "peeking out of a box", "balancing on a ball", "stretching", "juggling oranges",
        "carrying a backpack"]
PAIR = ["[1] hugging [2]", "[1] chasing [2]", "[1] sitting on top of [2]", "[1] jumping into [2]",
        "[1] hiding behind [2]", "[1] pushing [2]", "[1] sharing a meal with [2]", "[1] dancing with [2]",
        "[1] looking at [2]", "[1] playing catch with [2]", "[1] sleeping next to [2]", "[1] carrying [2]",
        "[1] racing [2]", "[1] whispering to [2]", "[1] peeking over [2]", "[1] leaning against [2]",
        "[1] holding [2] up high", "[1] walking beside [2]"]
GROUP = ["[1] and [2] watching [3]", "[1] sitting between [2] and [3]", "[1], [2] and [3] having a picnic",
         "[1] chasing [2] around [3]", "[1] and [2] lifting [3]", "[1] leading [2] and [3] in a parade",
         "[1], [2] and [3] posing for a photo", "[1] hiding behind [2] while [3] searches"]
PLACES = ["on a beach", "in a park", "in a snowy forest", "on a wooden table", "in a cozy kitchen", "on a city street",
          "in a flower garden", "on the moon", "in a library", "by a lake at sunset", "on a rooftop", "in a desert",
          "under the rain", "on a mountain top", "in a living room", "at a fairground", "in a meadow", "on a boat"]
STYLES = ["", "", "", ", photo", ", close-up", ", wide shot", ", soft light", ", at night"]


def _solo_scene(rng: random.Random, subjects: list[int]) -> str:
    acts = rng.sample(SOLO, len(subjects))
    parts = [f"[{s + 1}] {a}" for s, a in zip(subjects, acts)]
    return " while ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else parts[0]


def _interaction(rng: random.Random, n: int) -> str:
    if n == 1:
        return f"[1] {rng.choice(SOLO)}"
    order = list(range(n))
    rng.shuffle(order)  # who acts on whom varies
    if n == 2 or (n >= 3 and rng.random() < 0.5):
        pairs = [rng.choice(PAIR).replace("[1]", f"<{a}>").replace("[2]", f"<{b}>") for a, b in zip(order[::2], order[1::2])]
        text = " and ".join(pairs)
        if n % 2:
            text += f" while <{order[-1]}> is {rng.choice(SOLO)}"
    else:
        text = rng.choice(GROUP)
        text = MARKER.sub(lambda m: f"<{order[int(m.group(1)) - 1]}>", text)
        rest = order[3:]
        if rest:
            text += " while " + " and ".join(f"<{r}> is {rng.choice(SOLO)}" for r in rest)
    return re.sub(r"<(\d+)>", lambda m: f"[{int(m.group(1)) + 1}]", text)


def offline_prompts(num_subjects: int, k: int, seed: int = 0) -> list[PromptTemplate]:
    """``k`` distinct templates naming every subject: each subject acting on its own, or interacting."""
    if not 1 <= num_subjects <= 8:
        raise LLMError(f"Prompts are for 1 to 8 subjects, not {num_subjects}.")
    if k < 1:
        raise LLMError(f"The number of prompts must be at least 1 (got {k}).")
    rng = random.Random(seed)
    out: dict[str, PromptTemplate] = {}
    for _ in range(k * 200):
        if len(out) == k:
            break
        core = _solo_scene(rng, list(range(num_subjects))) if rng.random() < 0.35 else _interaction(rng, num_subjects)
        text = f"{core} {rng.choice(PLACES)}{rng.choice(STYLES)}"
        t = validate_template(text, num_subjects)
        if t is not None:
            out.setdefault(t.text.lower(), t)
    if len(out) < k:
        raise LLMError(f"Only {len(out)} distinct offline prompts could be made; ask for fewer.")
    return list(out.values())


# ----------------------------------------------------------------------------- LLM
LLM_INSTRUCTIONS = (
    "Write {k} different short image prompts (under {w} words each) for a text-to-image model. The scene has these "
    "subjects: {subjects}. Refer to each subject ONLY by its marker ({markers}), use every marker exactly once in every "
    "prompt, and vary what they do: about a third with each subject acting on its own in the same scene, the rest "
    "with them interacting (touching, chasing, carrying, sitting on, playing with each other) in varied places. "
    'Reply with JSON only: {{"prompts": ["[1] ...", ...]}}')


def parse_llm_prompts(reply: str, num_subjects: int) -> tuple[list[PromptTemplate], int]:
    """Valid distinct templates from the LLM's JSON, and how many entries were dropped."""
    text = reply.strip()
    if text.startswith("```"):
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LLMError(f"The LLM's reply is not JSON ({reply[:120]!r}); use a model that supports JSON output.") from e
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise LLMError('The LLM\'s reply has no "prompts" list.')
    out: dict[str, PromptTemplate] = {}
    for item in items:
        t = validate_template(item, num_subjects) if isinstance(item, str) else None
        if t is not None:
            out.setdefault(t.text.lower(), t)
    return list(out.values()), len(items) - len(out)


def llm_prompts(descriptions: Sequence[str], k: int, *, base_url: str, model: str, api_key: str, seed: int = 0,
                cache_dir=None, timeout: float = 120.0, should_stop=None, unload: bool = False
                ) -> tuple[list[PromptTemplate], int]:
    """Up to ``k`` templates written by the LLM, and the number of invalid or duplicate ones dropped.

    ``timeout`` bounds the call, retries included; ``should_stop()`` cancels between attempts; ``unload`` asks
    the server to unload the model after answering (``chat``)."""
    if k < 1:
        raise LLMError(f"The number of prompts must be at least 1 (got {k}).")
    n = len(descriptions)
    subjects = "; ".join(f"[{i + 1}] = {d}" for i, d in enumerate(descriptions))
    prompt = LLM_INSTRUCTIONS.format(k=k, w=MAX_PROMPT_WORDS, subjects=subjects,
                                     markers=", ".join(f"[{i + 1}]" for i in range(n)))
    templates, dropped = chat(base_url, model, [{"role": "user", "content": prompt}], seed=seed, api_key=api_key,
                              cache=ReplyCache(cache_dir), cache_key={"kind": "prompts", "prompt": prompt},
                              timeout=timeout, max_tokens=64 * k + 64, json_mode=True, should_stop=should_stop,
                              unload=unload,
                              parse=lambda reply: parse_llm_prompts(reply, n))
    if not templates:
        raise LLMError(f"None of the LLM's prompts named every subject marker ({dropped} dropped); try another model "
                       "or offline mode.")
    return templates[:k], dropped
