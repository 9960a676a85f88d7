"""Delivery webhooks: events of the spool's outbox, signed per Standard
Webhooks and POSTed to the callers' URLs by the daemon (docs/webhooks.md)."""
