"""qawatch: watch QA.tech chat conversations and deliver every finished assistant reply."""

__version__ = "0.1.0"
