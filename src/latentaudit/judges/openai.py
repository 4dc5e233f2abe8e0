"""LLM judge through any OpenAI-compatible chat-completions endpoint (standard library only).

Per completion and rubric question, one request ``POST {base_url}/chat/completions`` with the
rendered template as the user message, ``temperature=0`` and (unless disabled) ``logprobs=true,
top_logprobs=20``. Requests run in a thread pool.

Reading the reply:
1. If the first generated token's ``top_logprobs`` are present, each top token is mapped to a
   candidate answer (an integer of the scale, or a label it is a prefix of, ≥ 2 characters) and
   the rubric's distribution rule applies (probability-weighted score; discarded when the numeric
   mass is below ``min_mass``).
2. Otherwise, or when that yields no answer, the text is read by the rubric's parse rule; a
   number read from text is used only when no logprobs came back (a discarded weighted score
   is not replaced by the sampled number).

Failures: HTTP 429, 5xx, timeouts and connection errors are retried with exponential backoff
(``backoff · 2^attempt``, capped at ``max_backoff``, with up to 10 % jitter), waiting
``Retry-After`` instead when the server sends it. Other HTTP errors and malformed replies fail at
once. A failure becomes that completion's ``Verdict.error``; the batch goes on.

The API key is read from an environment variable (name configurable) at construction, sent only
in the ``Authorization`` header, never stored in the judge's id or repr, and scrubbed from every
error text.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from latentaudit.errors import LatentAuditError
from latentaudit.judges.base import JudgeItem, Verdict
from latentaudit.judges.rubrics import Answer, Question, Rubric

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 429}


class RequestFailed(Exception):
    """One request failed for good (message already scrubbed of the API key)."""


class OpenAIJudge:
    """Grades by a rubric through an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, model: str, rubric: Rubric, *, base_url: str = "https://api.openai.com/v1",
                 api_key_env: str = "OPENAI_API_KEY", workers: int = 8, timeout: float = 60.0,
                 retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
                 logprobs: bool = True, max_tokens: int = 8,
                 sleep: Callable[[float], None] = time.sleep):
        if not base_url.startswith(("http://", "https://")):
            raise LatentAuditError(f"--judge-base-url {base_url!r} must start with http:// or "
                                   "https://.")
        if workers < 1 or retries < 0 or timeout <= 0:
            raise LatentAuditError("--judge-workers must be ≥ 1, --judge-retries ≥ 0 and "
                                   "--judge-timeout > 0.")
        self.model, self.rubric = model, rubric
        self.base_url = base_url.rstrip("/")
        self.id = f"openai:{model}@{self.base_url}"
        self.workers, self.timeout, self.retries = workers, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.logprobs, self.max_tokens, self._sleep = logprobs, max_tokens, sleep
        self._key = os.environ.get(api_key_env) or None
        if self._key is None:
            log.warning("environment variable %s is not set: requests carry no API key",
                        api_key_env)

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
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": self.max_tokens}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=20)
        try:
            reply = self._post(body)
            text, top = parse_reply(reply)
        except RequestFailed as err:
            return None, str(err)
        answer = read_answer(q, text, top, self.rubric.min_mass)
        if answer is None:
            return None, f"unparseable answer {self._scrub(text[:80])!r}"
        return answer, None

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        url = f"{self.base_url}/chat/completions"
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            wait = None
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    head = self._scrub(raw[:80].decode("utf-8", "replace"))
                    raise RequestFailed(f"malformed reply (not JSON): {head!r}") from None
            except urllib.error.HTTPError as err:
                detail = self._scrub(_body(err)[:200].decode("utf-8", "replace"))
                last = f"HTTP {err.code}: {detail}".strip()
                if err.code not in RETRY_STATUS and err.code < 500:
                    raise RequestFailed(last) from None
                wait = retry_after(err.headers.get("Retry-After"))
            except TimeoutError:
                last = f"timed out after {self.timeout:g} s"
            except urllib.error.URLError as err:
                reason = err.reason
                last = (f"timed out after {self.timeout:g} s" if isinstance(reason, TimeoutError)
                        else f"connection failed: {self._scrub(str(reason))}")
            except (OSError, http.client.HTTPException) as err:
                last = f"connection failed: {self._scrub(str(err) or type(err).__name__)}"
            if attempt == self.retries:
                break
            if wait is None:
                wait = self.backoff * 2 ** attempt * (1 + 0.1 * random.random())
            self._sleep(min(wait, self.max_backoff))
        raise RequestFailed(f"{last} (gave up after {self.retries + 1} attempts)")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _body(err: urllib.error.HTTPError) -> bytes:
    try:
        return err.read() or b""
    except (OSError, http.client.HTTPException):
        return b""


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


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
