"""What every decoder shares, in no framework: the Stats a decode reports and the checks of a request's
settings (isd.py in PyTorch, mlx_port/isd.py in MLX, and the decoders built on them).
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


def check_settings(r):
    """Refuse a request's bad settings (SettingError names the one) before it decodes."""
    if r.max_new_tokens < 1:
        raise SettingError("max_new_tokens", f"max_new_tokens must be >= 1, got {r.max_new_tokens}")
    if r.temperature < 0:
        raise SettingError("temperature", f"temperature must be >= 0, got {r.temperature}")
    if not math.isfinite(r.temperature) or 0 < r.temperature < MIN_TEMPERATURE:  # logits / T overflows
        raise SettingError("temperature", f"temperature must be 0 (greedy) or a finite number >= "
                          f"{MIN_TEMPERATURE:g}, got {r.temperature}")
    if r.top_k is not None and r.top_k < 1:
        raise SettingError("top_k", f"top_k must be >= 1, got {r.top_k}")
    if r.top_p is not None and not 0 < r.top_p <= 1:
        raise SettingError("top_p", f"top_p must be in (0, 1], got {r.top_p}")
    if r.seed is not None and not 0 <= r.seed < 2 ** 63:
        raise SettingError("seed", f"seed must be in [0, 2**63), got {r.seed}")
    if len(r.prompt) == 0:
        raise ValueError("the prompt is empty: give at least one token")
