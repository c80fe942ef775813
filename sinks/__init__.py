"""ClickHouse: schema migrations, the idempotent sink, read-only analyst queries."""
