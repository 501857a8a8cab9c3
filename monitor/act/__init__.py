"""Orders (plan, issue, verify, publish), events and the audit trail."""
