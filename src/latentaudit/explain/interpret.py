"""One-line explanations of latents by a language model behind an OpenAI-compatible endpoint.

1. :func:`interpret_prompt` shows the model a latent's top-activating snippets (the activating
   token between «guillemets», with its activation) and its promoted and suppressed tokens, and
   asks for one line.
2. :class:`Interpreter` sends each prompt as one chat-completions request (``temperature=0``)
   through the official ``openai`` client, as the judge does (:mod:`latentaudit.judges.openai`:
   its reply parser, its keyless placeholder; timeout and retries with backoff by the client).
3. Answers are cached in a JSONL file (``{"key", "model", "explanation"}`` per line; key =
   sha256 of the endpoint, the model and the prompt), so a rerun sends nothing. The API key is
   read from an environment variable, handed only to the client and scrubbed from every message;
   it is never written anywhere. A failed request leaves that latent without an explanation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from latentaudit._io import write_jsonl
from latentaudit.errors import require
from latentaudit.judges.openai import NO_KEY, parse_reply

log = logging.getLogger(__name__)

PROMPT = """\
Below is one latent of a sparse autoencoder trained on a language model's residual stream.

Text where it fires most strongly (the strongest token of each snippet is between «guillemets», \
followed by its activation):
{examples}

Output tokens its direction promotes: {promoted}
Output tokens its direction suppresses: {suppressed}

In one line of at most 20 words, say what this latent detects or does. Reply with that line only."""


def interpret_prompt(examples: Sequence[dict], promoted: Sequence[str],
                     suppressed: Sequence[str], n: int = 10) -> str:
    """The prompt for one latent from its top examples (rows of latents.jsonl's
    ``top_examples``) and its logit-lens tokens (step 1)."""
    lines = []
    for ex in examples[:n]:
        toks = list(ex["tokens"])
        j = ex["max_index"]
        toks[j] = f"«{toks[j]}» ({ex['activation']:.2f})"
        lines.append("- " + "".join(toks).replace("\n", "\\n"))
    return PROMPT.format(examples="\n".join(lines) or "- (it never fired on the reference text)",
                         promoted=", ".join(repr(t) for t in promoted),
                         suppressed=", ".join(repr(t) for t in suppressed))


class Interpreter:
    """Asks an OpenAI-compatible endpoint for explanations, with the cache of step 3."""

    def __init__(self, model: str, *, base_url: str, api_key_env: str, timeout: float,
                 cache: str | os.PathLike, retries: int = 3, workers: int = 4) -> None:
        openai = require("openai", 'pip install "latentaudit[api]"', "--interpret-model")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.cache_file, self.workers = Path(cache), workers
        self._key = os.environ.get(api_key_env) or None
        if self._key is None:
            log.warning("environment variable %s is not set: requests carry no API key",
                        api_key_env)
        self._client = openai.OpenAI(api_key=self._key or NO_KEY, base_url=self.base_url,
                                     timeout=timeout, max_retries=retries)

    def __repr__(self) -> str:
        return f"Interpreter({self.model!r}@{self.base_url!r})"

    def key(self, prompt: str) -> str:
        blob = json.dumps([self.base_url, self.model, prompt])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _read_cache(self) -> dict[str, dict]:
        rows = {}
        if self.cache_file.exists():
            for line in self.cache_file.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn line: asked again
        return rows

    def explain(self, prompts: Sequence[str]) -> list[str | None]:
        """One explanation per prompt (None where the request failed)."""
        cached = self._read_cache()
        keys = [self.key(p) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in cached]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            answers = list(pool.map(lambda i: self._ask(prompts[i]), todo))
        for i, answer in zip(todo, answers, strict=True):
            if answer is not None:
                cached[keys[i]] = {"key": keys[i], "model": self.model, "explanation": answer}
        if todo:
            write_jsonl(self.cache_file, cached.values())
        return [cached[k]["explanation"] if k in cached else None for k in keys]

    def _ask(self, prompt: str) -> str | None:
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=60)
            text, _ = parse_reply(json.loads(raw.http_response.text))
        except Exception as err:  # a failed or unreadable reply: this latent gets no line
            log.warning("explanation request failed: %s", self._scrub(f"{type(err).__name__}: "
                                                                      f"{err}"))
            return None
        line = " ".join(text.strip().splitlines()[:1]).strip()
        return line or None

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text
