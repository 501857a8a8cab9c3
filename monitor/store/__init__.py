"""The only package that opens SQLite: connection, transactions, migrations, ledger."""
