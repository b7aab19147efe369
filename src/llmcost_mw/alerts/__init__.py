"""Alerts: SQL rules over `cost_events`, the watcher that runs them, and the ntfy notifier.

Typical use, as `llmcost watch` does it:

    rules = load_rules("rules.toml")  # or builtin_rules()
    notifier = NtfyNotifier("https://ntfy.sh/<topic>", token=...)
    Watcher(Store(url), rules, notifier).run_forever(stop_event)
"""

from .ntfy import NtfyNotifier
from .rules import Rule, builtin_rules, check_rule, load_rules, parse_rules
from .watcher import Alert, DeliveryError, Notification, Notifier, Watcher

__all__ = [
    "Alert",
    "DeliveryError",
    "Notification",
    "Notifier",
    "NtfyNotifier",
    "Rule",
    "Watcher",
    "builtin_rules",
    "check_rule",
    "load_rules",
    "parse_rules",
]
