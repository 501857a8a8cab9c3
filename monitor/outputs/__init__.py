"""What leaves the gateway: InfluxDB export and webhooks, with one retry policy.

Outputs read the store and write only their own outboxes; nothing here knows MQTT.

* ``retry`` -- the one back-off (exponential, equal jitter) and ``Retry-After`` parser;
* ``lineproto`` -- InfluxDB line protocol: the SPEC's three measurements, pure;
* ``exporter`` -- the InfluxDB export outbox and its sender;
* ``events`` -- one event written at once to the webhook outbox, the audit chain
  and the export outbox;
* ``webhooks/`` -- ``outbox`` (enqueue, backlog, purge, the SQL of ``events`` and
  ``webhook_deliveries``), ``render`` (body per format, summary, signature,
  headers) and ``send`` (``WebhookSender``: the POST, outcomes, retries).
"""
