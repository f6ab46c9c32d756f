"""Adapters to other libraries, each imported only when asked for (``qfilters.integrations.kvpress``); none of
those libraries is a dependency of qfilters."""
