"""The tracker: queues a finished call, and prices and counts it off the caller's thread."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque

from .errors import UnpricedModelError
from .events import CostEvent, Status
from .metrics import Metrics
from .pricing import PriceBook
from .recorder import Recorder

__all__ = ["Tracker"]

logger = logging.getLogger(__name__)

USAGE_UNKNOWN_WARNING = (
    "a call to model %r (provider %s) reported no token usage (a stream closed before its usage arrived, "
    "or an OpenAI chat stream without stream_options={'include_usage': True}), so its cost is recorded "
    "as unknown: cost_usd NULL, flag usage_unknown"
)
UNPRICED_WARNING = (
    "model %r (provider %s) is not in the price table; its calls are recorded with cost_usd NULL "
    "and unpriced = true until a price row is added (see `llmcost prices`)"
)


class Tracker:
    """Turns finished calls into priced, counted and queued cost events."""

    def __init__(
        self,
        recorder: Recorder,
        *,
        price_book: PriceBook | None = None,
        metrics: Metrics | None = None,
        strict: bool = False,
        dedup_window: int = 10_000,
    ) -> None:
        self.recorder = recorder
        self.price_book = price_book if price_book is not None else PriceBook.load()
        self.metrics = metrics
        self.strict = strict
        self._dedup_window = dedup_window
        self._recent_ids: OrderedDict[str, None] = OrderedDict()
        self._unpriced_warned: set[str] = set()
        self._lock = threading.Lock()
        self._pending: deque[CostEvent] = deque()
        self._process_lock = threading.Lock()

    def track(self, event: CostEvent) -> None:
        """Queue one event; it is priced and counted before its row is built.

        Pricing and counting run off the caller's thread: in the recorder's
        writer, or in `process_pending()` when a `/metrics` endpoint calls it.
        So a counter rises up to the recorder's flush interval after the call. In
        strict mode the event is priced here instead, and UnpricedModelError
        is raised after the row is queued. Any other failure is logged, never
        raised: the caller's LLM call has already succeeded.
        """
        if self.strict:
            self._prepare_one(event)
            self.recorder.record(event)
            # Only a model missing from the table: a call whose usage was
            # unknown or invalid is unpriced too, but no price row fixes it.
            if event.unpriced and self.price_book.lookup(event.model) is None:
                raise UnpricedModelError(event.model)
            return
        event.prepare = self.process_pending
        self._pending.append(event)
        self.recorder.record(event)

    def process_pending(self) -> None:
        """Price and count every queued event that is not yet priced."""
        with self._process_lock:
            while self._pending:
                event = self._pending.popleft()
                try:
                    self._prepare_one(event)
                except Exception:
                    logger.exception("pricing or counting a cost event failed; its row is written unpriced")
                finally:
                    event.prepare = None

    def _prepare_one(self, event: CostEvent) -> None:
        """Price one event and count it, unless its response id was counted already."""
        event.prepare = None
        event.resolve_usage()
        event.price_version = self.price_book.version
        if event.status == Status.NOT_CONSUMED:
            # The request was sent and may have been billed before the caller
            # let go of the response, and no usage arrived: the cost is unknown.
            event.flags = event.flags | {"usage_unknown"}
        flags = event.flags | event.usage.flags
        if "usage_unknown" in flags or "usage_invalid" in flags:
            # Tokens were spent but never reported (a chat stream without
            # `include_usage`), or reported in a form that could not be read,
            # so pricing the empty buckets would claim $0.
            event.unpriced = True
            event.cost_usd = None
            if "usage_unknown" in flags:
                key = f"usage:{event.provider}:{event.model}"
                self._warn_once(key, USAGE_UNKNOWN_WARNING, event.model, event.provider)
        else:
            self._price(event)
        # A repeated response id (batch results downloaded again) is counted
        # once; the store's unique index drops its second row.
        if event.response_id is not None and self._seen(str(event.response_id)):
            return
        if self.metrics is not None:
            try:
                self.metrics.observe(event)
            except Exception:
                logger.exception("counting a cost event in Prometheus failed; the event is still recorded")

    def _price(self, event: CostEvent) -> None:
        quote = self.price_book.quote(event.model, event.usage, batch=event.batch)
        if quote is None:
            event.unpriced = True
            event.cost_usd = None
            # A listed model can still lack a price for this call (fast mode
            # without fast-mode rates); the price book warns about that itself.
            if self.price_book.lookup(event.model) is None:
                self._warn_unpriced(event)
            return
        event.cost_usd = quote.cost_usd
        event.price_id = quote.price_id
        if quote.long_context:
            event.flags = event.flags | {"long_context"}

    def _seen(self, response_id: str) -> bool:
        # The store also rejects a repeated response id; this check keeps the
        # Prometheus counters from counting it twice in this process.
        with self._lock:
            if response_id in self._recent_ids:
                self._recent_ids.move_to_end(response_id)
                return True
            self._recent_ids[response_id] = None
            if len(self._recent_ids) > self._dedup_window:
                self._recent_ids.popitem(last=False)
            return False

    def _warn_unpriced(self, event: CostEvent) -> None:
        self._warn_once(event.model, UNPRICED_WARNING, event.model, event.provider)

    def _warn_once(self, key: str, message: str, *args: object) -> None:
        # Bounded, so that a client sending junk model ids cannot grow memory.
        if key in self._unpriced_warned:
            return
        with self._lock:
            if key in self._unpriced_warned or len(self._unpriced_warned) > 1_000:
                return
            self._unpriced_warned.add(key)
        logger.warning(message, *args)
