"""What leaves the gateway: InfluxDB export and webhooks, with one retry policy."""
