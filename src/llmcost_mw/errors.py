"""The package's exceptions. Every message names the bad value and the fix."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "LLMCostError",
    "PriceTableError",
    "RuleError",
    "RuleTimeoutError",
    "UnpricedModelError",
]


class LLMCostError(Exception):
    """Base class of every error this package raises."""


class ConfigurationError(LLMCostError, ValueError):
    """An option, URL or environment variable has an invalid value."""


class PriceTableError(ConfigurationError):
    """The price table file is malformed."""


class RuleError(ConfigurationError):
    """An alert rule is malformed."""


class RuleTimeoutError(LLMCostError):
    """An alert rule's query ran longer than the rule's `timeout_seconds` and was stopped."""


class UnpricedModelError(LLMCostError):
    """Raised in strict mode when a call used a model that the price table does not list.

    The call's row is written (with a NULL cost) before this is raised.
    """

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is not in the price table, so the call's cost is unknown; "
            "add a row for it to the price table (see `llmcost prices`) or pass strict=False"
        )
        self.model = model
