"""What every decoder shares, in no framework: the SamplingParams a request is decoded with and the Stats
a decode reports (isd.py in PyTorch, mlx_port/isd.py in MLX, and the decoders built on them).
"""
import math
from dataclasses import asdict, dataclass, fields

MIN_TEMPERATURE = 1e-6  # below it (but above 0, which is greedy) logits / temperature can overflow

@dataclass
class Stats:
    """What every decode reports (docs/method.md section 3). Stats add up: sum(stats, Stats()) gives
    the figures of several decodes together."""
    forwards: int = 0  # decoding forwards (prefill not counted)
    tokens: int = 0  # committed tokens
    drafts_verified: int = 0  # drafts verification reached: d_1 .. the first rejected one
    acceptance_sum: float = 0.0  # their sum of min(1, p(d)/q(d))
    rounds_v: int = 0  # verify steps with every draft accepted
    rounds_r: int = 0  # verify steps with a rejection
    rounds_c: int = 0  # cold starts (no drafts yet: the first forward after the prompt)
    wall_s: float = 0.0

    @property
    def tpf(self):
        """Tokens per forward."""
        return self.tokens / max(1, self.forwards)

    @property
    def acceptance_rate(self):
        """The mean acceptance probability min(1, p/q) of the drafts verification reached."""
        return self.acceptance_sum / max(1, self.drafts_verified)

    @property
    def tokens_per_s(self):
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def __add__(self, other):
        return Stats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self):
        return {**asdict(self), "tpf": self.tpf, "acceptance_rate": self.acceptance_rate,
                "tokens_per_s": self.tokens_per_s}


class SettingError(ValueError):
    """A bad request setting; `param` names it (serve.py reports it as the OpenAI API does)."""

    def __init__(self, param, message):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How a continuation is sampled, by every decoder (ISD, AR, the diffusion baselines): up to max_tokens new tokens,
    ending at the first of stop_ids (kept as the last token); each from the model's distribution at `temperature`
    (0 = greedy), cut to its top_k tokens and then to the top_p of the mass; seed: the request's own random stream
    (None: a fresh one). Bad values raise SettingError, which names the field."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = None
    top_p: float = None
    seed: int = None
    stop_ids: tuple = ()

    def __post_init__(self):
        self.stop_ids = tuple(self.stop_ids or ())
        if self.max_tokens < 1:
            raise SettingError("max_tokens", f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise SettingError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not math.isfinite(self.temperature) or 0 < self.temperature < MIN_TEMPERATURE:
            raise SettingError("temperature", f"temperature must be 0 (greedy) or a finite number >= "
                                              f"{MIN_TEMPERATURE:g}, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise SettingError("top_k", f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise SettingError("seed", f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def filter_key(self):
        """The settings that shape the distributions: requests with equal ones are filtered together."""
        return self.temperature, self.top_k, self.top_p
