"""The HTTP side: /healthz, /metrics and the queue page (docs/http.md)."""
