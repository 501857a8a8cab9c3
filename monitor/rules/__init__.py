"""Limit evaluation, alert state and the scheduled check."""
