"""The MQTT edge: subscription, per-format parsers, and the worker that commits readings."""
