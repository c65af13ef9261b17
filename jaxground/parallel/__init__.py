"""Meshes, logical-axis rules and multi-host setup, shared by training, inference and eval."""
