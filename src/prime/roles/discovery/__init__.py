"""The discovery role."""
