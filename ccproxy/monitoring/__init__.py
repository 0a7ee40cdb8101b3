"""Security monitoring: named detectors over request text, alert rules over the security events,
and the webhooks alerts go to (docs/incident-response.md)."""
