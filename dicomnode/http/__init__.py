"""The administrator's page, JSON API, Prometheus metrics and health check."""
