"""Built-in adapters, one kernel per module.  Imported lazily by the registry."""
