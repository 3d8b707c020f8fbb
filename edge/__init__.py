"""cmdfed edge role (built in its own issue)."""
