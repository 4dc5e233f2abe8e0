"""LLM judge through any OpenAI-compatible chat-completions endpoint (the ``openai`` package).

Per completion and rubric question, one chat-completions request with the rendered template as
the user message, ``temperature=0`` and (unless disabled) ``logprobs=true, top_logprobs=20``.
Requests run in a thread pool of ``workers``.

Reading the reply:
1. If the first generated token's ``top_logprobs`` are present, each top token is mapped to a
   candidate answer (an integer of the scale, or a label it is a prefix of, ≥ 2 characters) and
   the rubric's distribution rule applies (probability-weighted score; discarded when the numeric
   mass is below ``min_mass``).
2. Otherwise, or when that yields no answer, the text is read by the rubric's parse rule; a
   number read from text is used only when no logprobs came back (a discarded weighted score
   is not replaced by the sampled number).

Transport: the official ``openai`` client (``pip install "latentaudit[api]"``) sends every
request with its own timeout (``timeout`` seconds per attempt) and retries (HTTP 408, 409, 429,
5xx, timeouts and connection errors, up to ``retries`` times, with exponential backoff and
jitter, or the server's Retry-After). The raw body is read by :func:`parse_reply`, so a reply
that is not the expected JSON fails clearly. Any failure becomes that completion's
``Verdict.error``; the batch goes on.

The API key is read from an environment variable (name configurable) at construction and handed
only to the client; it is never part of the judge's id or repr, and it is scrubbed from every
error text. Without one, the placeholder ``EMPTY`` is sent (what keyless local servers accept).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from latentaudit.errors import require
from latentaudit.judges.base import JudgeItem, Verdict
from latentaudit.judges.rubrics import Answer, Question, Rubric
from latentaudit.options import OptionError

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429}
"""Statuses the client retries, besides 5xx."""
NO_KEY = "EMPTY"


class RequestFailed(Exception):
    """One reply could not be read (message already scrubbed of the API key)."""


class OpenAIJudge:
    """Grades by a rubric through an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, model: str, rubric: Rubric, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str = "OPENAI_API_KEY", workers: int = 8, timeout: float = 60.0,
                 retries: int = 5, logprobs: bool = True, max_tokens: int = 8):
        if not base_url.startswith(("http://", "https://")):
            raise OptionError("judge_base_url", f"{{}} {base_url!r} must start with http:// or "
                                                "https://.")
        if workers < 1 or retries < 0 or timeout <= 0:
            raise OptionError("judge_workers", "{} must be ≥ 1, {judge_retries} ≥ 0 and "
                                               "{judge_timeout} > 0.")
        self._openai = require("openai", 'pip install "latentaudit[api]"', "The openai judge")
        self.model, self.rubric = model, rubric
        self.base_url = base_url.rstrip("/")
        self.id = f"openai:{model}@{self.base_url}"
        self.workers, self.timeout, self.retries = workers, timeout, retries
        self.logprobs, self.max_tokens = logprobs, max_tokens
        self._key = os.environ.get(api_key_env) or None
        if self._key is None:
            log.warning("environment variable %s is not set: requests carry no API key",
                        api_key_env)
        self._client = self._openai.OpenAI(api_key=self._key or NO_KEY, base_url=self.base_url,
                                           timeout=timeout, max_retries=retries)

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.id!r})"

    def grade(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        tasks = [(i, q) for i in range(len(items)) for q in self.rubric.questions]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(lambda t: self._ask(items[t[0]], t[1]), tasks))
        verdicts = [Verdict() for _ in items]
        for (i, q), (answer, error) in zip(tasks, results, strict=True):
            if answer is not None:
                verdicts[i].answers[q.name] = answer
            if error is not None:
                prior = verdicts[i].error
                verdicts[i].error = f"{prior}; {q.name}: {error}" if prior else f"{q.name}: {error}"
        return verdicts

    def _ask(self, item: JudgeItem, q: Question) -> tuple[Answer | None, str | None]:
        try:
            return self._ask_once(item, q)
        except Exception as err:  # one odd reply must not end the batch
            log.debug("judge request failed: %s", self._scrub(repr(err)))
            return None, self._scrub(f"unexpected {type(err).__name__}: {err}")

    def _ask_once(self, item: JudgeItem, q: Question) -> tuple[Answer | None, str | None]:
        prompt = self.rubric.render(q, item.prompt_text, item.completion, item.fact)
        extra = {"logprobs": True, "top_logprobs": 20} if self.logprobs else {}
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=[{"role": "user", "content": prompt}],
                temperature=0, max_tokens=self.max_tokens, **extra)
        except self._openai.APIError as err:
            return None, self._describe(err)
        body = raw.http_response.text
        try:
            text, top = parse_reply(json.loads(body))
        except json.JSONDecodeError:
            return None, f"malformed reply (not JSON): {self._scrub(body[:80])!r}"
        except RequestFailed as err:
            return None, self._scrub(str(err))
        answer = read_answer(q, text, top, self.rubric.min_mass)
        if answer is None:
            return None, f"unparseable answer {self._scrub(text[:80])!r}"
        return answer, None

    def _describe(self, err: Exception) -> str:
        """One line for a request the client gave up on, without the key."""
        gave_up = f" (gave up after {self.retries + 1} attempts)"
        if isinstance(err, self._openai.APITimeoutError):
            return f"timed out after {self.timeout:g} s{gave_up}"
        if isinstance(err, self._openai.APIConnectionError):
            cause = err.__cause__ or err
            return f"connection failed: {self._scrub(str(cause) or type(cause).__name__)}{gave_up}"
        if isinstance(err, self._openai.APIStatusError):
            try:
                detail = err.response.text[:200]
            except Exception:  # a body that could not be read
                detail = ""
            code = err.status_code
            retried = code in RETRY_STATUS or code >= 500
            return (f"HTTP {code}: {self._scrub(detail)}".strip()
                    + (gave_up if retried else ""))
        return self._scrub(f"{type(err).__name__}: {err}")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def parse_reply(reply: dict) -> tuple[str, list[tuple[str, float]] | None]:
    """(content text, [(token, logprob)] of the first token or None) from a chat reply."""
    try:
        choice = reply["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("content is not a string")
    except (KeyError, IndexError, TypeError) as err:
        raise RequestFailed(f"malformed reply: no choices[0].message.content ({err})") from None
    top = None
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice, dict) else None
    if isinstance(content, list) and content and isinstance(content[0], dict):
        entries = content[0].get("top_logprobs") or []
        top = [(e["token"], float(e["logprob"])) for e in entries
               if isinstance(e, dict) and isinstance(e.get("token"), str)
               and isinstance(e.get("logprob"), (int, float))] or None
    return text, top


def token_probs(q: Question, top: list[tuple[str, float]]) -> dict[str, float]:
    """Map first-token logprobs onto the question's candidate answers."""
    probs: dict[str, float] = {}
    lo, hi = q.scale or (0, -1)
    for token, logprob in top:
        t = token.strip().lstrip("*`'\"").upper()
        if t.isascii() and t.isdigit() and lo <= int(t) <= hi:
            key = str(int(t))
        else:
            hits = [lb for lb in q.labels if len(t) >= 2 and lb.startswith(t)]
            if len(hits) != 1:
                continue
            key = hits[0]
        probs[key] = probs.get(key, 0.0) + math.exp(logprob)
    return probs


def read_answer(q: Question, text: str, top: list[tuple[str, float]] | None,
                min_mass: float) -> Answer | None:
    """The rubric answer from a reply: logprobs first, then the text (see module docstring)."""
    if top:
        answer = q.from_probs(token_probs(q, top), min_mass)
        if answer is not None:
            answer.raw = f"{text} ({answer.raw})"
            return answer
    parsed = q.parse_text(text)
    if parsed is None:
        return None
    if top and q.kind == "score" and parsed.label is None:
        return Answer(raw=f"{text} (weighted score discarded: numeric mass < {min_mass})")
    return parsed
