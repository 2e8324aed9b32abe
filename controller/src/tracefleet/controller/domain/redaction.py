"""The controller's redaction: the shared rules (``tracefleet.model.redaction``), which the
controller sends to every agent and applies again to every sampled event it receives, so an
agent that did not redact (an older or a hostile one) cannot show a secret to an operator."""

from tracefleet.model.redaction import DEFAULT_RULES, MASK, Patterns, default_patterns, mask, spans

TextRedactor = Patterns  # the controller's pass over sampled events

__all__ = ["DEFAULT_RULES", "MASK", "Patterns", "TextRedactor", "default_patterns", "mask", "spans"]
