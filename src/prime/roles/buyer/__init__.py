"""The buyer role."""
