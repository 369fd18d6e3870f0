"""Persistence: SQLModel tables and the async engine (SQLite by default, PostgreSQL via asyncpg)."""
