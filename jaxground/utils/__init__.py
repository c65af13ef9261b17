"""Small helpers every other folder may use (and that use nothing of jaxground's)."""
