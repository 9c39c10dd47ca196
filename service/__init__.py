"""tokenledger: a double-entry ledger of AI-token credits on PostgreSQL."""

__version__ = "0.1.0"
