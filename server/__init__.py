"""cmdfed server role (built in its own issue)."""
