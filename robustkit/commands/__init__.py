"""Click commands beyond the registry listings: audit, harden, export."""
