"""Per-feature, per-user and per-request cost of LLM calls in Python web apps.

Add `LLMCostMiddleware` (ASGI) or `LLMCostWSGIMiddleware` (WSGI; for Flask,
`llmcost_mw.flask_ext.LLMCostFlask`) to the app, call `instrument()` once,
and keep calling the Anthropic SDK as before: every billable call becomes one
row of `cost_events` with its tokens, USD cost and latency.
"""

from .asgi import LLMCostMiddleware
from .context import Attribution, attribute, current_attribution, set_attribution, start_thread, submit
from .errors import ConfigurationError, LLMCostError, PriceTableError, RuleError, UnpricedModelError
from .instrumentation import current_tracker, instrument, tracked_create, uninstrument
from .metrics import Metrics, make_metrics_asgi_app, make_metrics_wsgi_app
from .pricing import PriceBook
from .recorder import Recorder
from .store import Store
from .wsgi import LLMCostWSGIMiddleware

__all__ = [
    "Attribution",
    "ConfigurationError",
    "LLMCostError",
    "LLMCostMiddleware",
    "LLMCostWSGIMiddleware",
    "Metrics",
    "PriceBook",
    "PriceTableError",
    "Recorder",
    "RuleError",
    "Store",
    "UnpricedModelError",
    "attribute",
    "current_attribution",
    "current_tracker",
    "instrument",
    "make_metrics_asgi_app",
    "make_metrics_wsgi_app",
    "set_attribution",
    "start_thread",
    "submit",
    "tracked_create",
    "uninstrument",
]

__version__ = "0.1.0"
