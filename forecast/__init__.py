"""Shared pieces of the forecasting engine: settings, schemas, logging, metrics and the CLI."""

__version__ = "0.1.0"
