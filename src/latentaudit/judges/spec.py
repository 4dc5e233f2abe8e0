"""A ``--judge`` spec, parsed once: the registry of backends and the one place that builds a
backend's constructor options (standard library only: the command line reads it).

1. :data:`REGISTRY` lists each backend: its argument (a file or a model), whether it needs one,
   the class that grades, and its default batch size when it runs a model.
2. :meth:`JudgeSpec.parse` splits ``backend[:ARG]`` and checks the backend; with a rubric it
   resolves ``auto`` (the rubric's shipped probe when it has one, else its rules).
3. :func:`backend_options` turns the judge options (of ``latentaudit judge`` or a run config's
   ``[judge]``) into the keyword arguments of the backend's constructor.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from latentaudit.errors import LatentAuditError


@dataclass(frozen=True)
class Backend:
    """One kind of judge."""

    name: str
    arg: str
    """What follows the colon, as the error messages write it (FILE, MODEL, LABELS_FILE)."""
    needs_arg: bool
    arg_is_file: bool
    judge: str
    """``module:Class`` of the judge."""
    batch_size: int | None = None
    """Default sequences per forward pass (None: the backend runs no model here)."""


REGISTRY = {b.name: b for b in (
    Backend("rules", "FILE", False, True, "latentaudit.judges.rules:RuleJudge"),
    Backend("openai", "MODEL", True, False, "latentaudit.judges.openai:OpenAIJudge"),
    Backend("local", "MODEL", True, False, "latentaudit.judges.local:LocalJudge", 16),
    Backend("human", "LABELS_FILE", True, True, "latentaudit.judges.human:HumanJudge"),
    Backend("probe", "FILE", False, True, "latentaudit.judges.probe:ProbeJudge", 8),
)}
BACKENDS = tuple(REGISTRY)
EXAMPLES = "e.g. rules, openai:gpt-4o, local:MODEL, human:labels.csv, probe:probe.safetensors"


@dataclass(frozen=True)
class JudgeSpec:
    """``backend`` and its argument (a file or model; None when not given)."""

    backend: str
    arg: str | None = None

    @classmethod
    def parse(cls, text: str, rubric: Any = None, flag: str = "--judge") -> JudgeSpec:
        """The spec ``text`` names (``auto`` resolved when ``rubric`` is given, else kept)."""
        if text == "auto" and rubric is not None:
            from latentaudit.judges.probe import shipped_probes

            text = "probe" if rubric.name in shipped_probes() else "rules"
        kind, _, arg = str(text).partition(":")
        if kind == "auto" and not arg:
            return cls("auto")
        if kind not in REGISTRY:
            raise LatentAuditError(f"{flag} {text}: the backend must be one of "
                                   f"{', '.join(BACKENDS)} ({EXAMPLES}).")
        return cls(kind, arg or None)

    @property
    def info(self) -> Backend:
        return REGISTRY[self.backend]

    def __str__(self) -> str:
        return self.backend if self.arg is None else f"{self.backend}:{self.arg}"

    def with_file(self, resolve) -> JudgeSpec:
        """The spec with its file argument passed through ``resolve`` (a path resolver)."""
        if self.arg is None or self.backend == "auto" or not self.info.arg_is_file:
            return self
        return JudgeSpec(self.backend, resolve(self.arg))

    def check_arg(self, flag: str = "--judge") -> None:
        if self.arg is None and self.info.needs_arg:
            raise LatentAuditError(f"{flag} {self}: write {self.backend}:{self.info.arg}.")

    def judge_class(self):
        module, _, name = self.info.judge.partition(":")
        return getattr(importlib.import_module(module), name)


def backend_options(spec: JudgeSpec, opts: Any, device: str = "auto",
                    dtype: str = "float32") -> dict[str, Any]:
    """Constructor options of ``spec``'s backend from judge options ``opts`` (anything with the
    fields of ``latentaudit judge``'s flags: ``judge_base_url``, ``judge_api_key_env``,
    ``judge_workers``, ``judge_timeout``, ``judge_retries``, ``no_logprobs``, ``batch_size``,
    ``judge_model``); an unset batch size is the backend's default."""
    batch = getattr(opts, "batch_size", None)
    batch = spec.info.batch_size if batch is None else batch
    if spec.backend == "openai":
        return dict(base_url=opts.judge_base_url, api_key_env=opts.judge_api_key_env,
                    workers=opts.judge_workers, timeout=opts.judge_timeout,
                    retries=opts.judge_retries, logprobs=not opts.no_logprobs)
    if spec.backend == "local":
        return dict(device=device, dtype=dtype, batch_size=batch)
    if spec.backend == "probe":
        return dict(model=getattr(opts, "judge_model", None), device=device, dtype=dtype,
                    batch_size=batch)
    return {}
