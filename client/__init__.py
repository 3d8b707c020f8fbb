"""cmdfed client role (built in its own issue)."""
