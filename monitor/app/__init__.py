"""Wiring: the service, scheduler, CLI and HTTP surface."""
