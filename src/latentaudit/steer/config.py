"""The steering sweep's configuration and its conditions."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentaudit.options import OptionError, whole
from latentaudit.runfolder import ConditionKey

METHODS = ("attribution", "activation", "random", "model-diff", "given")
DIRECTIONS = ("away", "toward")
SCALES = ("relative", "absolute")


@dataclass
class SteerConfig:
    """How to steer, sample and grade."""

    top_k: int = 10
    """Latents per selection method (top-K by Δ-attribution, by Δ-activation, K random)."""
    methods: tuple[str, ...] = ("attribution", "activation", "random")
    """Selection methods to compare: attribution, activation, random, model-diff (needs
    --base-model)."""
    directions: tuple[str, ...] = ("away", "toward")
    """away: subtract the latent's direction (negative α); toward: add it (positive α)."""
    strengths: tuple[float, ...] = (0.5,)
    """Steering strengths |α|, a fraction of the mean residual norm at the layer (relative
    scale) or raw (absolute scale). With --search: the ladder searched per latent."""
    scale: str = field(default="relative", metadata={"choices": SCALES})
    """relative: α is a multiple of the mean residual norm at the layer; absolute: raw α."""
    search: bool = False
    """Per latent and direction, take the largest strength of the ladder whose incoherence
    stays at or below --max-incoherence (measured on --search-n completions per strength)."""
    max_incoherence: float = 0.10
    """Largest share of incoherent completions the strength search accepts."""
    search_n: int = 24
    """Completions per strength tried by the search."""
    joint: bool = False
    """Also steer each method's whole latent set at once (the sum of its directions)."""
    n: int = 2
    """Completions per held-out prompt and condition."""
    max_prompts: int | None = None
    """Use at most this many held-out prompts (in suite order)."""
    temperature: float = 1.0
    """Sampling temperature of the steered completions."""
    top_p: float = 0.9
    """Nucleus sampling mass of the steered completions."""
    max_new_tokens: int = 48
    """Most tokens per steered completion."""
    seed: int = 0
    """Base seed: every condition uses the same per-(prompt, sample) seeds as the baseline."""
    batch_size: int = 32
    """Completions generated together (rows of different conditions share a batch; 0 or auto:
    chosen from free device memory)."""
    system: str | None = None
    """System prompt for prompts that carry none."""
    n_boot: int = 2000
    """Bootstrap resamples (of whole prompts) for confidence intervals."""
    level: float = 0.95
    """Confidence level of the intervals."""
    random_seed: int = 0
    """Seed of the random (null) latents."""
    logodds: bool = True
    """Run the first-token log-odds check when the rubric declares a signature."""
    logodds_top: int = 100
    """The log-odds check also covers this many latents of the run's ranking (0: the sweep's
    latents only)."""

    logodds_prompts: int | None = None
    """The log-odds check reads the first N held-out prompts (default: all of them)."""
    logodds_only: bool = False
    """Run only the log-odds check (no sampling, no judge): a cheap first look."""

    @property
    def forward_batch(self) -> int:
        """Rows per forward-only pass (residual norm, log-odds, model diff): ``batch_size``, or
        32 when generation batches are sized automatically (those passes are light)."""
        return self.batch_size or 32

    def __post_init__(self) -> None:
        self.methods, self.directions = tuple(self.methods), tuple(self.directions)
        self.strengths = tuple(float(s) for s in self.strengths)
        for name, low in (("top_k", 1), ("n", 1), ("max_new_tokens", 1), ("batch_size", 0),
                          ("search_n", 1), ("n_boot", 100), ("logodds_top", 0)):
            whole(name, getattr(self, name), low)
        for name in ("max_prompts", "logodds_prompts"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise OptionError(name, f"{{}} must be ≥ 1, got {value!r}.")
        for name, allowed in (("methods", METHODS), ("directions", DIRECTIONS)):
            values = getattr(self, name)
            bad = [v for v in values if v not in allowed]
            if bad or not values or len(set(values)) != len(values):
                raise OptionError(name, f"{{}} takes distinct values among "
                                        f"{', '.join(allowed)}, got {','.join(values)!r}.")
        if self.scale not in SCALES:
            raise OptionError("scale", f"{{}} must be relative or absolute, got {self.scale!r}.")
        if not self.strengths or not all(s > 0 for s in self.strengths):
            raise OptionError("strengths", f"{{}} must be positive numbers (the direction sets "
                                           f"the sign), got {list(self.strengths)}.")
        if not 0 <= self.max_incoherence <= 1:
            raise OptionError("max_incoherence", "{} must be in [0, 1].")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise OptionError("temperature", "{} must be ≥ 0 and {top_p} in (0, 1].")
        if self.logodds_only and not self.logodds:
            raise OptionError("logodds_only", "{} and --no-logodds contradict each other.")
        if not 0.5 <= self.level < 1:
            raise OptionError("level", "{} must be in [0.5, 1).")


@dataclass(frozen=True)
class Condition:
    """One steering condition: latents steered together, a direction and a strength."""

    method: str
    """Selection method, or "base" for the unsteered baseline."""
    latents: tuple[int, ...] = ()
    direction: str = "none"
    strength: float = 0.0
    """|α| as configured (relative or absolute)."""
    alpha: float = 0.0
    """Signed coefficient on the sum of unit decoder directions (absolute units)."""
    model: str = "main"
    """main: the model under study; toward: the --toward-model."""
    phase: str = "final"
    """final, or search (a strength tried by the per-latent search)."""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        if self.method == "base":
            return "base" if self.model == "main" else f"base@{self.model}"
        lat = "+".join(map(str, self.latents))
        tail = "" if self.model == "main" else f"@{self.model}"
        head = "search:" if self.phase == "search" else ""
        return f"{head}{self.method}/{lat}/{self.direction}/{self.strength:g}{tail}"

    @property
    def condition_key(self) -> ConditionKey:
        """What is generated: the same latents, direction, strength and model under two
        selection methods share their completions."""
        if self.method == "base":
            return ConditionKey(model=self.model)
        return ConditionKey(tuple(self.latents), self.direction, self.strength, self.model)

    @property
    def key(self) -> str:
        """:attr:`condition_key` as written in the sweep's files."""
        return str(self.condition_key)

    @property
    def base_id(self) -> str:
        return str(self.condition_key.base)
