"""cmdfed dashboard role (built in its own issue)."""
