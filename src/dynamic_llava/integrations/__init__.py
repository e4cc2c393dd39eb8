"""Integrations with other tools (lmms-eval); each is imported only by the tool that loads it."""
