"""Shutdown, resume and limit orders: planned, issued, cleared, verified and published.

One job per module (``docs/orders.md``):

* ``orders`` -- :class:`~monitor.act.orders.Actions`, the one object the service,
  the check and the CLI hold; it only delegates to the modules below;
* ``plan`` -- a scope's meters, and which of them a limit order sheds;
* ``issue`` -- recording an order: de-duplication, the hourly rate limit and refusals;
* ``resume`` -- what a cleared breach and an operator's resume switch back on;
* ``verify`` -- confirmation by metered power, re-sends, failure, violations;
* ``publish`` -- MQTT publication after the commit (order JSON, device commands);
* ``journal`` -- the audit entry, event and metric that every order change leaves;
* ``repo`` -- every SQL statement on ``orders`` and ``order_meters`` (this package owns them);
* ``model`` -- the shared values: ``Order``, states, ``ShedPlan``, ``Progress``,
  ``ActionsError``, the ULID factory, ``device_command``.
"""
