"""The wire protocol: every message between roles, declared once. Imports no role."""
