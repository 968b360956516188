"""Small helpers that set up each notebook's demonstrations (toys and one-off measurements)."""
